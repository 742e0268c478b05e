"""A read-only sequence of strings kept as one UTF-8 blob plus offsets.

A Gemma vocabulary has 262,144 pieces. As Python ``str`` objects (most hold U+2581, so they are two bytes per
character plus ~75 bytes of header) they take ~30 MB; as a blob and an offset array they take ~4 MB. Pieces
are decoded when asked for, which costs a fraction of a microsecond.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence, overload

import numpy as np


class StringTable(Sequence[str]):
    """``n`` strings: ``blob[offsets[i]:offsets[i + 1]]`` is the UTF-8 of string ``i``."""

    __slots__ = ("blob", "offsets")

    def __init__(self, blob: bytes, offsets: np.ndarray) -> None:
        self.blob = blob
        self.offsets = offsets  # (n + 1,) int64, offsets[0] == 0, offsets[-1] == len(blob)

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> StringTable:
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.bytes_at(i).decode("utf-8")

    def bytes_at(self, i: int) -> bytes:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"string index {i} out of range for {n} strings")
        i %= n
        return self.blob[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def lengths(self) -> np.ndarray:
        """Byte length of every string, (n,) int64."""
        return np.diff(self.offsets)

    def __iter__(self) -> Iterator[str]:
        blob, offsets = self.blob, self.offsets.tolist()
        for a, b in zip(offsets, offsets[1:]):
            yield blob[a:b].decode("utf-8")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringTable):
            return self.blob == other.blob and np.array_equal(self.offsets, other.offsets)
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StringTable({len(self)} strings, {len(self.blob)} bytes)"


def as_string_table(strings: Sequence[str]) -> StringTable:
    return strings if isinstance(strings, StringTable) else StringTable.from_strings(strings)
