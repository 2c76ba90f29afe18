"""The runtime: the ``stitchc`` command line (and, later, kernel builds, caches and launchers)."""
