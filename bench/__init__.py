"""Benchmarks: fusion plans of the workloads, the cpu pattern set, the client benchmark
(``bench.clients``) and the per-call overhead measurement (``bench.overhead``).

Run as modules (``python -m bench.clients``) without the Makefile, caches still stay inside the
checkout, never in the home directory: importing the package sets the cache variables the
Makefile sets, unless they are set already.
"""

import os
from pathlib import Path

_CACHE = Path(__file__).resolve().parents[1] / ".stitch_cache"
for _var, _sub in (("STITCH_CACHE_DIR", ""), ("TRITON_CACHE_DIR", "triton"),
                   ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ.setdefault(_var, str(_CACHE / _sub) if _sub else str(_CACHE))
