"""The CPU kernels in csrc/, compiled once per machine with the system C compiler and loaded with ctypes.

No PyTorch headers are involved, so a build takes about a second. When no compiler is present (or the build
fails) :func:`kernels` returns None, logs one warning with the reason, and callers use the (much slower)
PyTorch fallback; :func:`kernel_status` says which; ``GEMMAKIT_NO_KERNELS=1`` forces that.
The library is cached under ``$XDG_CACHE_HOME/gemmakit`` (default ``~/.cache/gemmakit``), keyed by the source,
the compiler flags and the CPU's feature flags (``-march=native`` code is specific to the machine).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("qgemv.c", "decode.c", "layers.c")]
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-lm"]


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gemmakit" / "kernels"


FALLBACK_NOTE = "falling back to PyTorch: quantized models decode much slower (tens of times)"

# Why the kernels are not in use, when they are not (None while they are, or before the first call).
_unavailable_reason: str | None = None


def _build(target: Path) -> str | None:
    """Compile the kernels into ``target``; None on success, else the reason it failed, in one line."""
    missing = [str(path) for path in SOURCES if not path.is_file()]
    if missing:
        return f"kernel sources missing from the installation: {', '.join(missing)}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler found (install gcc, or set CC)"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        try:
            proc = subprocess.run([compiler, *FLAGS, "-o", str(out), *map(str, SOURCES)], capture_output=True,
                                  text=True)
        except OSError as exc:
            return f"cannot run the C compiler {compiler!r}: {exc.strerror or exc}"
        if proc.returncode != 0 or not out.is_file():
            said = " ".join((proc.stderr or proc.stdout).split())[:300] or "no output"
            return f"{compiler} exited with status {proc.returncode}: {said}"
        os.replace(out, target)  # atomic: concurrent builders never see a half-written library
    return None


def _unavailable(reason: str) -> None:
    global _unavailable_reason
    _unavailable_reason = reason
    logger.warning("CPU kernels unavailable: %s; %s", reason, FALLBACK_NOTE)


def kernel_status() -> dict[str, object]:
    """Whether the compiled kernels are in use, and if not, why: ``{"available": bool, "reason": str | None}``
    (shown by ``gemmakit bench`` and the server's ``/health``)."""
    available = kernels() is not None
    return {"available": available, "reason": None if available else _unavailable_reason}


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it cannot be built here."""
    global _unavailable_reason
    if os.environ.get("GEMMAKIT_NO_KERNELS") == "1":
        _unavailable_reason = "turned off by GEMMAKIT_NO_KERNELS=1"  # asked for: no warning
        return None
    if platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        _unavailable(f"no kernels for the {platform.machine()} processor")
        return None
    try:
        source = b"".join(path.read_bytes() for path in SOURCES)
    except OSError:
        source = b""  # _build names the missing files
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"qgemv-{key}.so"
    if not target.exists():
        try:
            failure = _build(target)
        except OSError as exc:  # e.g. a read-only cache folder
            failure = f"cannot write {target.parent}: {exc.strerror or exc}"
        if failure is not None:
            _unavailable(failure)
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        _unavailable(f"cannot load {target}: {exc}")
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.qgemv.argtypes = [p, p, p, p, p, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.qgemv.restype = ctypes.c_int
    lib.dequant_rows.argtypes = [p, p, p, ctypes.c_int, p, i64, i64, p, i64, ctypes.c_int, ctypes.c_int]
    lib.dequant_rows.restype = None
    lib.rms_norm.argtypes = [p, p, p, i64, i64, ctypes.c_float]
    lib.rms_norm.restype = None
    lib.split_blocks.argtypes = [ctypes.c_int, p, i64, i64, p, p, p, ctypes.c_int, ctypes.c_int]
    lib.split_blocks.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.attn_prep.argtypes = [p, i64, i64, i64, i64, i64, ctypes.c_int, p, ctypes.c_int, p, ctypes.c_int, ctypes.c_int,
                              f32, p, p, p, p, p, i64, p, p, ctypes.c_int]
    lib.attn_prep.restype = None
    lib.attend_decode.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, f32, f32, p, p, i64, i64,
                                  ctypes.c_int]
    lib.attend_decode.restype = None
    lib.geglu.argtypes = [p, p, i64, i64, ctypes.c_int]
    lib.geglu.restype = None
    lib.geglu_bf16.argtypes = [p, p, i64, i64, ctypes.c_int]
    lib.geglu_bf16.restype = None
    lib.argmax_f32.argtypes = [p, i64]
    lib.argmax_f32.restype = i64
    lib.argmax_rows.argtypes = [p, i64, i64, p, ctypes.c_int]
    lib.argmax_rows.restype = None
    lib.mask_logits.argtypes = [p, p, i64]
    lib.mask_logits.restype = None
    lib.decode_layers.argtypes = [p, i64, p, p, p, i64, i64, p, p, f32, i64, ctypes.c_int]
    lib.decode_layers.restype = ctypes.c_int
    return lib
