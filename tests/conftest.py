"""Test-wide settings: caches in a temporary directory, never the home directory."""

import os
import tempfile
import warnings

_tmp = tempfile.mkdtemp(prefix="stitch-tests-")
for var, sub in (("STITCH_CACHE_DIR", "stitch"), ("TRITON_CACHE_DIR", "triton"),
                 ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    os.environ.setdefault(var, os.path.join(_tmp, sub))

# torch.export's pytree emits this on every export; it is torch's, not ours.
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
