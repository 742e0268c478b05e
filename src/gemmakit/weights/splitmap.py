"""One read-only memory map over a file shipped in parts (the bundled model's package holds its GGUF in four
chunks), so that it is read in place rather than copied into one file first: the model is on disk once.

The parts are mapped back to back into one reserved range of addresses (POSIX ``mmap`` with ``MAP_FIXED``, through
ctypes). That needs every part but the last to be a whole number of pages long; :func:`map_parts` returns None
when a part is not, or the platform has no such ``mmap``, and the caller falls back to a joined copy.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from pathlib import Path
from typing import Sequence

PROT_NONE, PROT_READ = 0, 1
MAP_PRIVATE, MAP_FIXED = 0x02, 0x10
MAP_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", 0x20)
MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL | None:
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


class SplitMap:
    """The parts as one read-only buffer: ``view`` is a uint8 memoryview of their concatenation. The mapping
    lives as long as anything (such as a numpy view of a tensor) still refers to ``view``."""

    def __init__(self, libc: ctypes.CDLL, base: int, size: int) -> None:
        self._libc, self._base, self.size = libc, base, size
        array = (ctypes.c_ubyte * size).from_address(base)
        self.view = memoryview(array).cast("B")
        # Unmapped when the last reference to the memory (the ctypes array, held by every view) goes.
        weakref.finalize(array, libc.munmap, ctypes.c_void_p(base), ctypes.c_size_t(size))

    def drop_pages(self, start: int, length: int) -> None:
        """Let the kernel drop these resident pages (they are re-read from the files if touched again)."""
        self._libc.madvise(ctypes.c_void_p(self._base + start), length, getattr(mmap, "MADV_DONTNEED", 4))


def can_map(parts: Sequence[Path]) -> bool:
    """Whether :func:`map_parts` can map these files here: a POSIX mmap, and whole pages in every part but the
    last."""
    try:
        sizes = [Path(p).stat().st_size for p in parts]
    except OSError:
        return False
    return _libc() is not None and not any(size % mmap.PAGESIZE for size in sizes[:-1]) and sum(sizes) > 0


def map_parts(parts: Sequence[Path]) -> SplitMap | None:
    """Map ``parts`` back to back; None when this cannot be done here (see the module's docstring)."""
    if not can_map(parts):
        return None
    libc = _libc()
    sizes = [Path(p).stat().st_size for p in parts]
    total = sum(sizes)
    base = libc.mmap(None, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if base is None or base == MAP_FAILED:
        return None
    offset = 0
    for part, size in zip(parts, sizes):
        fd = os.open(part, os.O_RDONLY)
        try:
            placed = libc.mmap(base + offset, size, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0) if size else base
        finally:
            os.close(fd)
        if placed != base + offset:
            libc.munmap(ctypes.c_void_p(base), total)
            return None
        offset += size
    return SplitMap(libc, base, total)
