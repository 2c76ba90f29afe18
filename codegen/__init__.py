"""Code generators: kernel sources from ``fusion.group`` ops (``cpp`` for the cpu target)."""
