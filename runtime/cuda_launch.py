"""Load a cubin and launch its kernels on a CUDA device, with torch tensors' pointers.

Through CuPy (``RawModule(path=cubin)``) when CuPy is installed, else through the CUDA driver
API (``libcuda.so.1`` via ctypes: ``cuModuleLoadData``, ``cuLaunchKernel``,
``cuLaunchCooperativeKernel``). Either way: no copies (the kernels read and write the tensors'
own memory), torch's current stream, and a cooperative launch for a kernel with a grid
barrier, checked first against the occupancy the driver reports (a grid that does not fit one
wave would deadlock or be refused).

Not exercised here: no GPU was available while this was written (the same kernels run in the
cpu emulation and compile with nvcc); ``bench/gpu_check.py`` is the first run on a device.
"""

from __future__ import annotations

import ctypes
import threading

import torch

_lock = threading.Lock()
_driver = None
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16


def _cu():
    global _driver
    with _lock:
        if _driver is None:
            _driver = ctypes.CDLL("libcuda.so.1")
    return _driver


def _check(rc: int, what: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        _cu().cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"stitch cuda: {what} failed: {name.value.decode() if name.value else rc}")


def _ensure_context(device: torch.device) -> None:
    """The driver API needs a current context: torch's primary context of ``device``."""
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.cuda.current_stream()
        ctx = ctypes.c_void_p()
        _check(_cu().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            dev = ctypes.c_int()
            _check(_cu().cuDeviceGet(ctypes.byref(dev), device.index or 0), "cuDeviceGet")
            _check(_cu().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            _check(_cu().cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class DeviceModule:
    """The kernels of one cubin on one device."""

    def __init__(self, cubin_path, launches, device: torch.device):
        self.device = device
        self.launches = {ln.kernel: ln for ln in launches}
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.fns = {}
        try:
            import cupy
        except ImportError:
            cupy = None
        self.cupy = cupy
        if cupy is not None:
            with cupy.cuda.Device(device.index or 0):
                coop = any(ln.cooperative for ln in launches)
                mod = cupy.RawModule(path=str(cubin_path), enable_cooperative_groups=coop)
                for ln in launches:
                    fn = mod.get_function(ln.kernel)
                    if ln.smem > 48 * 1024:
                        fn.max_dynamic_shared_size_bytes = ln.smem
                    self.fns[ln.kernel] = fn
            return
        _ensure_context(device)
        image = open(cubin_path, "rb").read()
        mod = ctypes.c_void_p()
        _check(_cu().cuModuleLoadData(ctypes.byref(mod), image), "cuModuleLoadData")
        self.module = mod
        for ln in launches:
            fn = ctypes.c_void_p()
            _check(_cu().cuModuleGetFunction(ctypes.byref(fn), mod, ln.kernel.encode()),
                   f"cuModuleGetFunction({ln.kernel})")
            if ln.smem > 48 * 1024:
                _check(_cu().cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                ln.smem), "cuFuncSetAttribute")
            self.fns[ln.kernel] = fn

    def check_one_wave(self, ln) -> None:
        """A cooperative grid must be resident all at once: ask the driver."""
        if self.cupy is not None:
            return  # CuPy's cooperative launch checks it and raises
        n = ctypes.c_int()
        _check(_cu().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(n), self.fns[ln.kernel], ln.block, ctypes.c_size_t(ln.smem)),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        if ln.grid > n.value * self.sms:
            raise RuntimeError(f"stitch cuda: {ln.kernel}: {ln.grid} blocks do not fit one wave "
                               f"({n.value} per SM x {self.sms} SMs); the plan must split it")

    def launch(self, ln, pointers: list[int]) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if self.cupy is not None:
            import numpy as np

            cupy = self.cupy
            with cupy.cuda.Device(self.device.index or 0), cupy.cuda.ExternalStream(stream):
                self.fns[ln.kernel]((ln.grid,), (ln.block,),
                                    tuple(np.uint64(p) for p in pointers), shared_mem=ln.smem)
            return
        vals = [ctypes.c_void_p(p) for p in pointers]
        params = (ctypes.c_void_p * max(1, len(vals)))(*[ctypes.addressof(v) for v in vals])
        if ln.cooperative:
            self.check_one_wave(ln)
            rc = _cu().cuLaunchCooperativeKernel(self.fns[ln.kernel], ln.grid, 1, 1, ln.block, 1, 1,
                                                 ln.smem, ctypes.c_void_p(stream), params)
            _check(rc, f"cuLaunchCooperativeKernel({ln.kernel})")
        else:
            rc = _cu().cuLaunchKernel(self.fns[ln.kernel], ln.grid, 1, 1, ln.block, 1, 1, ln.smem,
                                      ctypes.c_void_p(stream), params, None)
            _check(rc, f"cuLaunchKernel({ln.kernel})")
