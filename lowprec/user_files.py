"""Reading a file a user named (a recipe, a text corpus): every way it can be wrong, said plainly.

A directory, a missing path, a FIFO or device (reading it could block or never end) and an
unreadable file each get a message naming the file and what it was expected to be, instead of
"does not exist" for all of them or a raw traceback.
"""

from __future__ import annotations

from pathlib import Path


def read_user_file(path: str | Path, what: str, expected: str) -> bytes:
    """The bytes of the regular file ``path``, described in errors as ``what`` (e.g. "recipe file")
    and, for a directory, as not being ``expected`` (e.g. "a TOML file").

    Raises ``IsADirectoryError``, ``FileNotFoundError`` or ``OSError`` with a one-line message."""
    path = Path(path)
    shown = f"{what} {str(path)!r}"
    if path.is_dir():
        raise IsADirectoryError(f"{shown} is a directory, not {expected}")
    if not path.exists():
        raise FileNotFoundError(f"{shown} does not exist")
    if not path.is_file():  # a FIFO or device
        raise OSError(f"{shown} is not a regular file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise OSError(f"{shown} cannot be read: {e.strerror or e}") from None
