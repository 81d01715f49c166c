"""Files: result files written so that a crash never leaves a half-written one behind, and
early checks of the model paths users pass."""

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


def check_model_path(name_or_path: str, argument: str) -> None:
    """Fail early on a local model path that does not exist, naming the command-line argument.

    A hub name such as "Salesforce/blip-itm-base-coco" is left to `from_pretrained`, which would
    otherwise report a missing folder as an invalid repository name.

    Raises:
        FileNotFoundError: `name_or_path` looks like a local path and does not exist.
    """
    if Path(name_or_path).exists():
        return
    looks_local = (
        name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )
    if looks_local:
        raise FileNotFoundError(f"{argument} {name_or_path!r}: no such file or folder.")
