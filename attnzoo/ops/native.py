"""Our compiled CPU kernels: built from the C++ sources shipped in the package, at first use.

The sources use a plain C ABI (no Python or torch headers), so a build takes a few seconds with
any C++17 compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``) and needs nothing else.
The shared library is cached under ``$ATTNZOO_CACHE`` (default ``~/.cache/attnzoo``) in a
directory named after a hash of the source, the flags, the compiler and the CPU, and is
loaded with :mod:`ctypes`. ``ATTNZOO_NATIVE=0`` disables the kernels (``auto`` then never
picks them and :func:`unavailable` says so).

Flags: ``-O3 -march=native -fopenmp`` where the compiler accepts them; without OpenMP the
kernels run on one thread, without ``-march=native`` on the baseline instruction set.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

ENV_DISABLE = "ATTNZOO_NATIVE"
ENV_CACHE = "ATTNZOO_CACHE"
_SOURCES = {
    "gather": Path(__file__).parent / "backends" / "gather_kernels.cpp",
    "tiles": Path(__file__).parent / "backends" / "tile_kernels.cpp",
    "routed": Path(__file__).parent / "backends" / "routed_kernels.cpp",
}
# Headers the sources include (next to them): part of every library's hash.
_HEADERS = tuple(Path(__file__).parent / "backends" / name for name in ("kernels_exp.h", "kernels_gemm.h"))
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
_BASE_FLAGS = ["-std=c++17", "-shared", "-fPIC"]

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}
_errors: dict[str, str] = {}


def enabled() -> bool:
    """False when ``ATTNZOO_NATIVE`` is set to 0 / false / off / no."""
    return os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "off", "no")


def compiler() -> str | None:
    """The C++ compiler used for builds (``$CXX`` or the first of c++, g++, clang++ on PATH)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if Path(cxx).is_file() else None)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def cache_dir() -> Path:
    """Where built libraries live: ``$ATTNZOO_CACHE/kernels``, else ``~/.cache/attnzoo/kernels``, else
    (home not writable) a per-user folder in the temporary directory."""
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "attnzoo")
    path = Path(root) / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / f"attnzoo-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "kernels"
        path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_tag() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    model += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return platform.machine() + platform.processor() + model


def _library_path(name: str, cxx: str) -> Path:
    digest = hashlib.sha256()
    digest.update(_SOURCES[name].read_bytes())
    for header in _HEADERS:
        digest.update(header.read_bytes())
    for part in (cxx, repr(_FLAG_SETS), repr(_BASE_FLAGS), _cpu_tag()):
        digest.update(part.encode())
    return cache_dir() / f"{name}-{digest.hexdigest()[:16]}" / f"libattnzoo_{name}.so"


def _build(name: str, cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAG_SETS:
        # Build into a temporary file and rename: concurrent processes never load a partial library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cxx, *flags, *_BASE_FLAGS, str(_SOURCES[name]), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, target)
            return
        os.unlink(tmp)
        errors.append(f"$ {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}")
    raise RuntimeError("building attnzoo's C++ kernels failed:\n" + "\n".join(errors))


def load(name: str = "gather") -> ctypes.CDLL:
    """The kernel library ``name`` (built on first use); raises RuntimeError saying why it is unavailable."""
    reason = unavailable(name)
    if reason is not None:
        raise RuntimeError(reason)
    return _loaded[name]


def unavailable(name: str = "gather") -> str | None:
    """Why the kernel library ``name`` cannot be used (None when it is loaded; builds it if needed)."""
    if not enabled():
        return f"attnzoo's compiled CPU kernels are disabled ({ENV_DISABLE}=0)"
    if name in _loaded:
        return None
    if name in _errors:
        return _errors[name]
    with _lock:
        if name in _loaded or name in _errors:
            return _errors.get(name)
        cxx = compiler()
        if cxx is None:
            _errors[name] = ("no C++ compiler found for attnzoo's CPU kernels (set $CXX or install g++ / clang++; "
                             "they build in seconds at first use)")
            return _errors[name]
        target = _library_path(name, cxx)
        try:
            if not target.exists():
                print(f"attnzoo: building the compiled CPU kernels ({name}) for this machine, once: a few seconds "
                      f"(cached in {target.parent})", file=sys.stderr, flush=True)
                _build(name, cxx, target)
            _loaded[name] = ctypes.CDLL(str(target))
        except (OSError, RuntimeError) as exc:
            _errors[name] = f"{exc}"
            return _errors[name]
    return None


def kernel_pair(name: str, prefix: str, suffix: str, forward_args: list, backward_args: list) -> tuple[Any, Any]:
    """``{prefix}_forward_{suffix}`` and ``{prefix}_backward_{suffix}`` of library ``name``, with their ctypes
    argument types set on first use."""
    lib = load(name)
    fwd = getattr(lib, f"{prefix}_forward_{suffix}")
    bwd = getattr(lib, f"{prefix}_backward_{suffix}")
    if fwd.argtypes is None:
        fwd.argtypes, bwd.argtypes = forward_args, backward_args
        fwd.restype = bwd.restype = None
    return fwd, bwd


def ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for the kernels (None: a null pointer)."""
    return None if t is None else t.data_ptr()


class PairBias(NamedTuple):
    """An additive per-head bias for the kernels: ``table`` ``[H, n_bias]`` read at ``index`` (int32, one entry
    per (query, key slot) pair of the kernel's layout)."""

    table: torch.Tensor
    index: torch.Tensor


def pair_bias_args(bias: PairBias | None) -> tuple[int | None, int | None, int]:
    """The kernels' ``bias, bias_idx, n_bias`` arguments (null pointers and 0 without a bias)."""
    return (None, None, 0) if bias is None else (bias.table.data_ptr(), bias.index.data_ptr(), bias.table.shape[1])


def reset() -> None:
    """Forget loaded libraries and recorded build errors (tests; a later call rebuilds or reloads)."""
    with _lock:
        _loaded.clear()
        _errors.clear()


__all__ = ["ENV_DISABLE", "PairBias", "cache_dir", "compiler", "enabled", "kernel_pair", "load", "pair_bias_args",
           "ptr", "reset", "unavailable"]
