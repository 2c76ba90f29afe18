"""Math functions generated Triton kernels call as ``libm.<name>``: libdevice on a GPU, numpy
stand-ins under ``TRITON_INTERPRET=1``.

Triton's interpreter runs a kernel's Python body on numpy arrays but cannot run libdevice's
extern functions (they return nothing there), so a kernel module binds ``libm = libm()`` when it
is loaded: the libdevice module when it is compiled for a GPU, else a module of numpy-backed
functions with the same names. Only the functions the code generator emits are listed.
"""

from __future__ import annotations

import types

import numpy as np
import triton.language as tl
from triton import knobs
from triton.language.extra import libdevice

NAMES = {"log1p": np.log1p, "expm1": np.expm1, "tan": np.tan, "tanh": np.tanh, "rint": np.rint,
         "trunc": np.trunc, "pow": np.power, "atan2": np.arctan2, "fmod": np.fmod}


def _numpy(fn):
    def call(*xs):
        from triton.runtime.interpreter import TensorHandle

        t = next(x for x in xs if isinstance(x, tl.tensor))
        scalar = t.type.scalar
        data = [x.handle.data if isinstance(x, tl.tensor) else x for x in xs]
        with np.errstate(all="ignore"):
            out = np.asarray(fn(*data)).astype(t.handle.data.dtype)
        ty = tl.block_type(scalar, list(out.shape)) if out.ndim else scalar
        return tl.tensor(TensorHandle(out, scalar), ty)

    return call


_INTERPRETED = types.ModuleType("stitch_libm_interpreted")
for _name, _fn in NAMES.items():
    setattr(_INTERPRETED, _name, _numpy(_fn))


def libm() -> types.ModuleType:
    """The module a kernel's ``libm.<name>`` resolves in, for the current mode."""
    return _INTERPRETED if knobs.runtime.interpret else libdevice
