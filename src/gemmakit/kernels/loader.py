"""The CPU kernels in csrc/, compiled once per machine with the system C compiler and loaded with ctypes.

Every exported function and struct is declared in csrc/gemmakit_kernels.h; abi.py reads that header for the
ctypes signatures and checks the library's ABI number before anything calls it.

No PyTorch headers are involved, so a build takes about a second. When no compiler is present (or the build
fails) :func:`kernels` returns None, logs one warning with the reason, and callers use the (much slower)
PyTorch fallback; :func:`kernel_status` says which; ``GEMMAKIT_NO_KERNELS=1`` forces that.
The library is cached under ``$XDG_CACHE_HOME/gemmakit`` (default ``~/.cache/gemmakit``), keyed by the source,
the compiler flags and the CPU's feature flags (``-march=native`` code is specific to the machine).
``GEMMAKIT_KERNELS_LIB=/path/lib.so`` uses a library built elsewhere (a packager's); one built for another ABI
number is refused with the reason, and the kernels are then built from the sources as usual.
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

from . import abi

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("abi.c", "qgemv.c", "qgemm.c", "decode.c", "layers.c", "sample.c")]
HEADERS = [CSRC / name for name in ("gemmakit_kernels.h", "vecmath.h", "qpack.h")]
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", f"-I{CSRC}", "-lm"]


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
    missing = [str(path) for path in SOURCES + HEADERS if not path.is_file()]
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


def _load(path: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """The library at ``path`` with its signatures bound, or why it cannot be used."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"cannot load {path}: {exc}"
    problem = abi.bind(lib)
    return (lib, None) if problem is None else (None, f"refusing {path}: {problem}")


def _prebuilt() -> ctypes.CDLL | None:
    """The library GEMMAKIT_KERNELS_LIB names, when it is set and usable (else a warning says why)."""
    path = os.environ.get("GEMMAKIT_KERNELS_LIB")
    if not path:
        return None
    lib, problem = _load(Path(path))
    if problem is not None:
        logger.warning("GEMMAKIT_KERNELS_LIB: %s; building the kernels from the sources instead", problem)
    return lib


def _built() -> ctypes.CDLL | None:
    """The library built from this installation's sources (built now when not cached)."""
    try:
        source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    except OSError:
        source = b""  # _build names the missing files
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    for attempt in range(2):
        if not target.exists():
            try:
                failure = _build(target)
            except OSError as exc:  # e.g. a read-only cache folder
                failure = f"cannot write {target.parent}: {exc.strerror or exc}"
            if failure is not None:
                _unavailable(failure)
                return None
        lib, problem = _load(target)
        if problem is None:
            return lib
        if attempt == 0:  # a damaged or stale cached file: build it once more
            logger.warning("CPU kernels: %s; rebuilding", problem)
            target.unlink(missing_ok=True)
    _unavailable(problem)
    return None


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The compiled kernel library with its signatures bound from the header, or None when it cannot be built
    or loaded here."""
    global _unavailable_reason
    if os.environ.get("GEMMAKIT_NO_KERNELS") == "1":
        _unavailable_reason = "turned off by GEMMAKIT_NO_KERNELS=1"  # asked for: no warning
        return None
    if platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        _unavailable(f"no kernels for the {platform.machine()} processor")
        return None
    return _prebuilt() or _built()


def release_thread_workers() -> None:
    """End the calling thread's idle OpenMP workers (csrc/abi.c says why), so that the thread that runs the
    decode steps keeps workers that spin between its parallel regions instead of sleeping. For a thread that is
    done with parallel work: the one that loaded a model, the one that made an engine's cache. It gets new
    workers if it runs parallel work again; nothing happens without the kernels."""
    lib = kernels()
    if lib is not None:
        lib.release_thread_workers()
