"""Build, cache and load the C++ kernels of the ``cpu`` target.

The code generator renders each fused kernel as one C++17 source string that exports
``extern "C" int <symbol>(void* const* args)``: ``args`` holds the raw data pointers of the
inputs, then the outputs, then the scratch buffers; the function returns 0 on success.
This module turns such a string into a callable :class:`Kernel`.

Invariants:

- One source string + one flag list + one compiler (path and ``--version``) + one host CPU
  give one file stem ``<name>-<sha256 prefix>`` under :func:`cache_dir`; the library is
  ``<stem>.so`` and the source it was built from is ``<stem>.cpp`` next to it, for users to read.
- A file under a final name is always complete: sources and libraries are written to unique
  temporary names in the cache directory and ``os.replace``-d into place (atomic on one
  filesystem). So any number of processes may build the same kernel at once; they all succeed
  and the last rename wins with identical bytes. A library already ``dlopen``-ed keeps its
  inode, so replacing the file under a running process is safe.
- If ``<stem>.so`` exists nothing is compiled (``stats()["cache_hits"]``). The OpenMP probe is
  remembered in memory and on disk, so a warm process compiles nothing at all.
- A failed compile raises :class:`BuildError` and keeps ``<stem>.cpp`` on disk (but no ``.so``).
- Generated code may rely on the macro ``STITCH_OPENMP`` (1 or 0): without OpenMP the kernels
  are built without ``-fopenmp``, ``#pragma omp`` is ignored, and ``#include <omp.h>`` must be
  guarded by ``#if STITCH_OPENMP``.

Environment: ``CXX`` (compiler), ``STITCH_CXXFLAGS`` (appended to :func:`default_flags`),
``STITCH_CACHE_DIR`` (cache root; kernels go to its ``kernels/`` folder).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "BuildError",
    "Kernel",
    "build_library",
    "cache_dir",
    "compiler",
    "default_flags",
    "load_kernel",
    "load_library",
    "openmp_available",
    "stats",
    "write_atomic",
]

# Bump when the calling convention or the cache layout changes: old libraries are then ignored.
_LAYOUT_VERSION = 1
_STDERR_CAP = 20_000
_BASE_FLAGS = (
    "-O3",
    "-march=native",
    "-std=c++17",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-fno-trapping-math", "-ffp-contract=off",
)

_lock = threading.Lock()
_stats = {"compiled": 0, "cache_hits": 0, "loaded": 0}
_versions: dict[str, str] = {}  # compiler path -> first line of --version
_openmp: dict[tuple[str, str], bool] = {}  # (compiler path, cache dir) -> probe result
_libraries: dict[str, ctypes.CDLL] = {}  # resolved path -> loaded library
_cpu_id: str | None = None


class BuildError(RuntimeError):
    """The C++ compiler failed (or none was found).

    The message holds the command line, the compiler's stderr (first ~20k characters) and the
    path of the source kept on disk, also in ``source_path`` (None when no source was written).
    """

    def __init__(
        self,
        message: str,
        *,
        command: list[str] | None = None,
        stderr: str = "",
        source_path: Path | None = None,
        returncode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.command = command
        self.stderr = stderr
        self.source_path = source_path
        self.returncode = returncode


def _bump(counter: str) -> None:
    with _lock:
        _stats[counter] += 1


def stats() -> dict[str, int]:
    """A copy of this process's counters: ``compiled``, ``cache_hits``, ``loaded`` (dlopens)."""
    with _lock:
        return dict(_stats)


def cache_dir() -> Path:
    """``$STITCH_CACHE_DIR/kernels`` (default ``~/.cache/stitch/kernels``), created on demand."""
    root = os.environ.get("STITCH_CACHE_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "stitch"
    path = base / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compiler() -> str:
    """The C++ compiler's absolute path: ``$CXX`` if set, else the first of g++, c++, clang++."""
    cxx = os.environ.get("CXX")
    candidates = [cxx] if cxx else ["g++", "c++", "clang++"]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    where = f"$CXX={cxx!r}" if cxx else "g++, c++ or clang++"
    raise BuildError(f"no C++ compiler found ({where} is not on PATH); install one or set CXX")


def _version(cxx: str) -> str:
    # Part of the cache key: a compiler upgrade must not reuse old libraries.
    with _lock:
        if cxx in _versions:
            return _versions[cxx]
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError as exc:
        raise BuildError(f"cannot run the C++ compiler {cxx}: {exc}", command=[cxx, "--version"]) from exc
    line = out.splitlines()[0].strip() if out.strip() else "unknown"
    with _lock:
        _versions[cxx] = line
    return line


def _host_cpu() -> str:
    # -march=native makes a library specific to this CPU: a cache shared between machines
    # (an NFS home) must not hand one host's AVX-512 code to another.
    global _cpu_id
    if _cpu_id is None:
        model = ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(("model name", "flags", "Features", "CPU part")):
                        model += line.split(":", 1)[-1].strip() + ";"
                        if line.startswith(("flags", "Features")):
                            break
        except OSError:
            pass
        _cpu_id = f"{platform.machine()};{model or platform.processor()}"
    return _cpu_id


def _tmp_name(stem: str, suffix: str) -> str:
    return f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` under a temporary name, then rename it into place: a reader never sees
    half a file (the kernel, Triton and CUDA caches all write this way)."""
    tmp = path.with_name(_tmp_name(path.stem, path.suffix))
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


_PROBE = """#include <omp.h>
int main() {
  int n = 0;
#pragma omp parallel reduction(+ : n)
  n += 1;
  return (n >= 1 && omp_get_max_threads() >= 1) ? 0 : 1;
}
"""


def openmp_available() -> bool:
    """Whether the compiler accepts ``-fopenmp`` and links a program using ``omp.h``.

    Probed once per compiler by compiling a tiny program in the cache directory; the answer
    is kept in memory and in a small file there keyed by the compiler's path and version, so a
    later process with a warm cache compiles nothing.
    """
    cxx = compiler()
    folder = cache_dir()
    with _lock:
        answer = _openmp.get((cxx, str(folder)))
    if answer is not None:
        return answer
    key = hashlib.sha256(json.dumps([cxx, _version(cxx), _LAYOUT_VERSION]).encode()).hexdigest()[:20]
    memo = folder / f"probe-openmp-{key}.txt"
    try:
        answer = memo.read_text().strip() == "1"
    except OSError:
        # Known from another cache directory in this process: just record it in this one too.
        with _lock:
            answer = next((v for (c, _), v in _openmp.items() if c == cxx), None)
        if answer is None:
            answer = _probe_openmp(cxx, folder)
        write_atomic(memo, "1\n" if answer else "0\n")
    with _lock:
        _openmp[(cxx, str(folder))] = answer
    return answer


def _probe_openmp(cxx: str, folder: Path) -> bool:
    src = folder / _tmp_name("probe-openmp", ".cpp")
    exe = folder / _tmp_name("probe-openmp", ".out")
    try:
        src.write_text(_PROBE)
        result = subprocess.run([cxx, "-fopenmp", str(src), "-o", str(exe)], capture_output=True, check=False)
        return result.returncode == 0
    except OSError:
        return False
    finally:
        src.unlink(missing_ok=True)
        exe.unlink(missing_ok=True)


def default_flags() -> list[str]:
    """``-O3 -march=native -std=c++17 -fPIC -shared -fno-math-errno -fno-trapping-math``,
    ``-fopenmp`` when available, ``-DSTITCH_OPENMP=1|0``, then ``$STITCH_CXXFLAGS``.

    No ``-ffast-math``: it lets the compiler assume no NaN or inf, which torch semantics need.
    """
    omp = openmp_available()
    flags = list(_BASE_FLAGS)
    if omp:
        flags.append("-fopenmp")
    flags.append(f"-DSTITCH_OPENMP={int(omp)}")
    flags += shlex.split(os.environ.get("STITCH_CXXFLAGS", ""))
    return flags


def _sanitize(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-")[:48]
    return clean or "kernel"


def build_library(source: str, name: str = "kernel", flags: list[str] | None = None) -> Path:
    """The path of the shared library built from ``source`` (compiled only on a cache miss).

    ``flags`` replaces :func:`default_flags` entirely (it must keep ``-shared -fPIC``).
    ``name`` is only a readable prefix of the file name. Raises :class:`BuildError` if the
    compiler fails; the source then stays on disk as ``<stem>.cpp``.
    """
    cxx = compiler()
    flags = default_flags() if flags is None else list(flags)
    key_parts = [_LAYOUT_VERSION, source, flags, cxx, _version(cxx)]
    if any(f.startswith(("-march=native", "-mcpu=native", "-mtune=native")) for f in flags):
        key_parts.append(_host_cpu())
    digest = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()
    folder = cache_dir()
    stem = f"{_sanitize(name)}-{digest[:24]}"
    lib, cpp = folder / f"{stem}.so", folder / f"{stem}.cpp"
    if lib.exists():
        if not cpp.exists():  # someone tidied the sources; keep the promise that it is readable
            write_atomic(cpp, source)
        _bump("cache_hits")
        return lib

    tmp_cpp = folder / _tmp_name(stem, ".cpp")
    tmp_lib = folder / _tmp_name(stem, ".so")
    tmp_cpp.write_text(source, encoding="utf-8")
    command = [cxx, *flags, str(tmp_cpp), "-o", str(tmp_lib)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace", check=False)
    except OSError as exc:
        os.replace(tmp_cpp, cpp)
        raise BuildError(
            f"cannot run the C++ compiler {cxx}: {exc}\nsource kept at: {cpp}",
            command=command,
            source_path=cpp,
        ) from exc
    # The source goes in place first, so a final .so always has its .cpp beside it.
    os.replace(tmp_cpp, cpp)
    if result.returncode != 0 or not tmp_lib.exists():
        tmp_lib.unlink(missing_ok=True)
        # Point the messages at the file the user can open, not the temporary it was compiled as.
        shown = [str(cpp) if part == str(tmp_cpp) else part for part in command]
        stderr = (result.stderr or "") + (result.stdout or "")
        stderr = stderr.replace(str(tmp_cpp), str(cpp))
        if len(stderr) > _STDERR_CAP:
            stderr = stderr[:_STDERR_CAP] + f"\n... [{len(stderr) - _STDERR_CAP} more characters cut]"
        raise BuildError(
            f"C++ compile of kernel {name!r} failed (exit code {result.returncode})\n"
            f"command: {shlex.join(shown)}\nsource kept at: {cpp}\ncompiler output:\n{stderr}",
            command=shown,
            stderr=stderr,
            source_path=cpp,
            returncode=result.returncode,
        )
    os.replace(tmp_lib, lib)
    _bump("compiled")
    return lib


def build_kernels(kernels: list[tuple[str, str]], prelude: str, flags: list[str] | None = None,
                  parts: int | None = None) -> dict[str, Path]:
    """Build many kernels as a few translation units; returns symbol -> library path.

    ``kernels`` are ``(symbol, body)`` pairs whose bodies all follow ``prelude`` (the includes
    and helpers they share). Starting the compiler and parsing the headers costs more than a
    kernel's own code, so the kernels not built before are compiled ``parts`` at a time (one
    unit per core by default, compiled concurrently). Every kernel gets a small reference file
    naming the library that holds it, keyed like :func:`build_library`'s cache: a kernel built
    before, in any batch, is found again and nothing is compiled for it.
    """
    from concurrent.futures import ThreadPoolExecutor

    cxx = compiler()
    flags = default_flags() if flags is None else list(flags)
    base = [_LAYOUT_VERSION, prelude, flags, cxx, _version(cxx)]
    if any(f.startswith(("-march=native", "-mcpu=native", "-mtune=native")) for f in flags):
        base.append(_host_cpu())
    folder = cache_dir()
    found: dict[str, Path] = {}
    todo: list[tuple[str, str, Path]] = []
    for symbol, body in dict(kernels).items():
        digest = hashlib.sha256(json.dumps(base + [body]).encode()).hexdigest()
        ref = folder / f"{_sanitize(symbol)}-{digest[:24]}.ref"
        try:
            lib = folder / ref.read_text(encoding="utf-8").strip()
        except OSError:
            lib = None
        if lib is not None and lib.exists():
            found[symbol] = lib
            _bump("cache_hits")
        else:
            todo.append((symbol, body, ref))
    if not todo:
        return found
    n = max(1, min(len(todo), parts or len(os.sched_getaffinity(0))))
    # balance the units by source length, keeping each unit's kernels in the given order
    units: list[list[tuple[str, str, Path]]] = [[] for _ in range(n)]
    sizes = [0] * n
    for item in sorted(todo, key=lambda t: -len(t[1])):
        k = sizes.index(min(sizes))
        units[k].append(item)
        sizes[k] += len(item[1])
    order = {sym: i for i, (sym, _, _) in enumerate(todo)}
    units = [sorted(u, key=lambda t: order[t[0]]) for u in units if u]

    def build(unit: list[tuple[str, str, Path]]) -> Path:
        source = prelude + "\n" + "\n".join(body for _, body, _ in unit)
        name = unit[0][0] if len(unit) == 1 else f"batch{len(unit)}_{unit[0][0]}"
        lib = build_library(source, name=name, flags=flags)
        for _, _, ref in unit:
            write_atomic(ref, lib.name)
        return lib

    with ThreadPoolExecutor(len(units)) as pool:
        for unit, lib in zip(units, pool.map(build, units)):
            for symbol, _, _ in unit:
                found[symbol] = lib
    return found


def load_library(path: str | os.PathLike[str]) -> ctypes.CDLL:
    """``dlopen`` the library at ``path`` once per process (later calls return the same CDLL)."""
    key = str(Path(path).resolve())
    with _lock:
        lib = _libraries.get(key)
        if lib is None:
            lib = _libraries[key] = ctypes.CDLL(key)
            _stats["loaded"] += 1
    return lib


class Kernel:
    """A loaded kernel: ``kernel(*pointers)`` calls ``int symbol(void* const* args)``.

    ``pointers`` are raw addresses (ints, e.g. ``tensor.data_ptr()``; 0 or None for null) of
    the inputs, outputs and scratch buffers in that order. A non-zero return raises
    RuntimeError. The call releases the GIL while the kernel runs.
    """

    __slots__ = ("symbol", "path", "source_path", "library", "_fn", "_packers")

    def __init__(self, library: ctypes.CDLL, symbol: str, path: Path, source_path: Path) -> None:
        self.library = library  # keeps the library (and so _fn) alive
        self.symbol = symbol
        self.path = path
        self.source_path = source_path
        try:
            fn = library[symbol]
        except AttributeError as exc:
            raise AttributeError(f'symbol {symbol!r} not found in {path} (declared extern "C"?)') from exc
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_int
        self._fn = fn
        # arity -> packer of n native pointers. A packed bytes object has the layout of a
        # (c_void_p * n) array and is about 3x cheaper to build; c_void_p passes its buffer.
        self._packers: dict[int, Callable[..., bytes]] = {}

    def pack(self, *pointers: int | None) -> bytes:
        """The argument array for ``pointers`` (n native pointers); reuse it with :meth:`call_packed`."""
        packer = self._packers.get(len(pointers))
        if packer is None:
            packer = self._packers[len(pointers)] = struct.Struct(f"{len(pointers)}P").pack
        try:
            return packer(*pointers)
        except struct.error:  # None means null; anything else is the caller's bug and raises again
            return packer(*(0 if p is None else p for p in pointers))

    def call_packed(self, args: bytes | ctypes.Array) -> None:
        """Call the kernel on an array from :meth:`pack` (or a ``(c_void_p * n)`` array)."""
        rc = self._fn(args)
        if rc:
            raise RuntimeError(f"kernel {self.symbol} ({self.path}) returned {rc}")

    def __call__(self, *pointers: int | None) -> None:
        # Inlined pack(): this runs on every kernel launch.
        packer = self._packers.get(len(pointers))
        if packer is None:
            packer = self._packers[len(pointers)] = struct.Struct(f"{len(pointers)}P").pack
        try:
            args = packer(*pointers)
        except struct.error:
            args = packer(*(0 if p is None else p for p in pointers))
        rc = self._fn(args)
        if rc:
            raise RuntimeError(f"kernel {self.symbol} ({self.path}) returned {rc}")

    def call_list(self, pointers: list[int]) -> int:
        """Call the kernel on a list of raw addresses (ints, no None): the runtime's hot path.
        Returns the kernel's return code (0, or its error bits) for the caller to report."""
        packer = self._packers.get(len(pointers))
        if packer is None:
            packer = self._packers[len(pointers)] = struct.Struct(f"{len(pointers)}P").pack
        return self._fn(packer(*pointers))

    def __repr__(self) -> str:
        return f"Kernel({self.symbol!r}, {str(self.path)!r})"


def load_built(path: Path, symbol: str) -> Kernel:
    """``symbol`` of the already built library at ``path`` (from :func:`build_kernels`)."""
    return Kernel(load_library(path), symbol, path, path.with_suffix(".cpp"))


def load_kernel(source: str, symbol: str, name: str | None = None, flags: list[str] | None = None) -> Kernel:
    """Build ``source`` (or find it in the cache), load it and return its ``symbol`` as a Kernel."""
    path = build_library(source, name=name or symbol, flags=flags)
    return Kernel(load_library(path), symbol, path, path.with_suffix(".cpp"))
