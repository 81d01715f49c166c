"""Writing result files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` through a temporary sibling file and `os.replace`.

    A failure at any point (full disk, interrupt) leaves a previous file at `path` untouched and
    removes the temporary file. The file gets the permissions of any normally written file.

    Raises:
        FileNotFoundError: if the folder of `path` does not exist.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"path={str(path)!r}: folder {str(target.parent)!r} does not exist; create it first."
        )

    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
