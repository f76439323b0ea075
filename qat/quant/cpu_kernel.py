"""One-pass fixed-scale fake quant on the CPU: ``fake_quant.c``, compiled at first use.

The tensor-op path of :class:`qat.quant.functional._FakeQuantSTE` reads and writes the tensor
four to five times (scale, round, clamp, mask, rescale); this kernel does it in one pass, with
the same float32 operations, so its results are bit for bit theirs (``tests/test_cpu_kernel.py``).
It is built with the system C compiler (``$CC``, else ``cc``) into ``<cache dir>/kernels``
(``$QAT_CACHE_DIR``, else ``~/.cache/qat``), keyed by source, flags and CPU, and threads with
the OpenMP runtime PyTorch has loaded. Without a compiler, or with ``QAT_CPU_KERNEL=0``, the
tensor-op path runs instead (one warning when the build fails).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["enabled", "available", "fake_quant", "library_path"]

SOURCE = Path(__file__).with_name("fake_quant.c")
# tried in order: the first that builds is used (-march=native: the CPU's vector units;
# -fopenmp: PyTorch's thread pool; neither is needed for correctness)
FLAG_SETS = (
    ("-O3", "-march=native", "-fno-math-errno", "-fopenmp"),
    ("-O3", "-fno-math-errno", "-fopenmp"),
    ("-O3", "-fno-math-errno"),
)
# below this many elements one thread does the whole tensor (PyTorch's grain size)
PARALLEL_MIN = 1 << 15

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed = False


def enabled() -> bool:
    """False when ``QAT_CPU_KERNEL=0`` (read on every call: tests and benchmarks switch it)."""
    return os.environ.get("QAT_CPU_KERNEL", "1").strip().lower() not in {"0", "false", "off", "no"}


def _compiler() -> str | None:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("cc") or shutil.which("gcc")


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags, where Linux tells them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    from ..data.paths import cache_dir  # at build time only: qat.data is a heavier import

    return cache_dir() / "kernels"


def library_path(cc: str, flags: tuple[str, ...]) -> Path:
    """Where the library built from this source with ``cc`` and ``flags`` is cached."""
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), cc, *flags, _cpu_key(), platform.machine()]).encode()).hexdigest()
    return _cache_dir() / f"fake_quant-{key[:16]}.so"


def _build(cc: str) -> Path:
    """The library of the first flag set that builds; a set that failed once (recorded beside
    its library as ``.failed``) is not tried again by later processes."""
    errors = []
    for flags in FLAG_SETS:
        path = library_path(cc, flags)
        if path.exists():
            return path
        failed = path.with_suffix(".failed")
        if failed.exists():
            errors.append(failed.read_text().strip() or "failed before")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        # a private file, renamed into place: concurrent jobs never load a half-written one
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        cmd = [cc, *flags, "-fPIC", "-shared", str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, path)
            return path
        os.unlink(tmp)
        errors.append((proc.stderr.strip().splitlines() or ["exit status "
                                                          f"{proc.returncode}"])[0])
        failed.write_text(errors[-1] + "\n")
    raise RuntimeError(errors[-1])


def _load() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    with _lock:
        if _lib is not None or _failed:
            return _lib
        cc = _compiler()
        try:
            if cc is None:
                raise RuntimeError("no C compiler found (set CC)")
            lib = ctypes.CDLL(str(_build(cc)))
        except (OSError, RuntimeError) as e:
            _failed = True
            warnings.warn(f"qat: the one-pass CPU fake-quant kernel could not be built ({e}); "
                          "using tensor ops (same results, slower). QAT_CPU_KERNEL=0 silences "
                          "this.", RuntimeWarning, stacklevel=3)
            return None
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        lib.qat_fake_quant.argtypes = [p, p, p, i64, i64, p, p, i64, p, p, f32, f32, ctypes.c_int]
        lib.qat_fake_quant.restype = None
        lib.qat_fake_quant_strided.argtypes = [p, p, p, ctypes.c_int, p, p, p, p, f32, f32,
                                               ctypes.c_int]
        lib.qat_fake_quant_strided.restype = None
        _lib = lib
        return _lib


def available() -> bool:
    """True when the kernel is enabled and built (building it on the first call)."""
    return enabled() and _load() is not None


def _bounds(b: float | Tensor, rows: int) -> tuple[float, Tensor | None]:
    if isinstance(b, Tensor):
        t = b.reshape(-1).float().contiguous()
        return 0.0, t if t.numel() == rows else None
    return float(b), None


def fake_quant(x: Tensor, scale: Tensor, lo: float | Tensor, hi: float | Tensor,
               mask: bool) -> tuple[Tensor, Tensor | None] | None:
    """``(clamp(round(x * (1 / scale)), lo, hi) * scale, inside-the-grid mask or None)`` in one
    pass, or None where the kernel does not apply (not a float32 CPU tensor, a scale that is
    neither one value nor one per leading row, a strided ``x`` other than a view with one scale
    and a contiguous last dim, under ``torch.compile``, disabled or not built). The output is
    contiguous. ``lo`` / ``hi``: numbers, or one per row (a per-row zero point's bounds)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0
            or scale.dtype != torch.float32 or torch.compiler.is_compiling() or not enabled()):
        return None
    s = scale.reshape(-1)
    srows = s.numel()
    strided = not x.is_contiguous()
    if strided:  # a permuted view (attention heads): one scale, last dim contiguous
        if (srows != 1 or x.dim() > 8 or x.stride(-1) != 1 or isinstance(lo, Tensor)
                or isinstance(hi, Tensor)):
            return None
        rows = 1
    elif srows == 1:
        rows = 1
    elif x.dim() >= 1 and scale.dim() >= 1 and scale.shape[0] == srows == x.shape[0]:
        rows = srows  # one scale per leading row: channel axis 0, or groups as rows
    else:
        return None
    lo_v, lo_t = _bounds(lo, rows)
    hi_v, hi_t = _bounds(hi, rows)
    if (isinstance(lo, Tensor) and lo_t is None) or (isinstance(hi, Tensor) and hi_t is None):
        return None
    lib = _load()
    if lib is None:
        return None
    s = s.contiguous()
    inv = s.reciprocal()  # what 1.0 / scale does, in float32
    out = torch.empty(x.shape, dtype=x.dtype)  # contiguous, whatever x's layout
    m = torch.empty(x.shape, dtype=torch.bool) if mask else None
    m_ptr = None if m is None else m.data_ptr()
    n = x.numel()
    threads = torch.get_num_threads() if n >= PARALLEL_MIN else 1
    if strided:  # x.data_ptr(): the view's first element (storage offset included)
        sizes = (ctypes.c_int64 * x.dim())(*x.shape)
        strides = (ctypes.c_int64 * x.dim())(*x.stride())
        lib.qat_fake_quant_strided(x.data_ptr(), out.data_ptr(), m_ptr, x.dim(), sizes, strides,
                                   s.data_ptr(), inv.data_ptr(), lo_v, hi_v, threads)
    else:
        lib.qat_fake_quant(
            x.data_ptr(), out.data_ptr(), m_ptr, rows, n // rows, s.data_ptr(), inv.data_ptr(),
            srows, None if lo_t is None else lo_t.data_ptr(),
            None if hi_t is None else hi_t.data_ptr(), lo_v, hi_v, threads)
    return out, m
