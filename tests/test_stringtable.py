"""StringTable: a vocabulary as one UTF-8 blob + offsets behaves as the list of strings it replaces."""

from __future__ import annotations

import pytest

from gemmakit.stringtable import StringTable, as_string_table

WORDS = ["<pad>", "", "\u2581the", "caf\u00e9", "\u65e5\u672c", "<0x0A>", "\U0001f600", "x" * 300]


def test_matches_the_list() -> None:
    table = StringTable.from_strings(WORDS)
    assert len(table) == len(WORDS)
    assert list(table) == WORDS and table == WORDS
    assert [table[i] for i in range(len(WORDS))] == WORDS
    assert table[-1] == WORDS[-1] and table[2:5] == WORDS[2:5]
    assert table.bytes_at(3) == "caf\u00e9".encode()
    assert list(table.lengths()) == [len(w.encode()) for w in WORDS]
    assert as_string_table(table) is table and as_string_table(WORDS) == table
    with pytest.raises(IndexError):
        table[len(WORDS)]
    assert table != WORDS[:-1]
