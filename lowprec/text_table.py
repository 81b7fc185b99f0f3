"""Plain-text tables: a header row, a rule of dashes, then the rows, columns left-aligned."""

from __future__ import annotations

from collections.abc import Sequence


def aligned_table(columns: Sequence[str], cells: Sequence[Sequence[str]], *, strip: bool = False) -> list[str]:
    """The lines of a table of string ``cells`` under ``columns``, each column as wide as its
    widest entry, columns two spaces apart; ``strip`` drops trailing spaces from every line."""
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        text = "  ".join(v.ljust(w) for v, w in zip(values, widths))
        return text.rstrip() if strip else text

    return [line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)]
