"""The CPU kernels in csrc/, compiled once per machine with the system C compiler and loaded with ctypes.

No PyTorch headers are involved, so a build takes about a second. When no compiler is present (or the build
fails) :func:`kernels` returns None and callers use the PyTorch fallback; ``GEMMAKIT_NO_KERNELS=1`` forces that.
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


def _build(target: Path) -> bool:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: using the slower PyTorch path for quantized matmuls")
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, "-o", str(out), *map(str, SOURCES)], capture_output=True, text=True)
        if proc.returncode != 0:
            logger.warning("building the CPU kernels failed (%s); using the PyTorch path", proc.stderr.strip()[:500])
            return False
        os.replace(out, target)  # atomic: concurrent builders never see a half-written library
    return True


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it cannot be built here."""
    if os.environ.get("GEMMAKIT_NO_KERNELS") == "1" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return None
    source = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"qgemv-{key}.so"
    if not target.exists() and not _build(target):
        return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        logger.warning("cannot load %s (%s); using the PyTorch path", target, exc)
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
    lib.decode_layers.argtypes = [p, i64, p, p, p, i64, i64, p, p, f32, i64, ctypes.c_int]
    lib.decode_layers.restype = ctypes.c_int
    return lib
