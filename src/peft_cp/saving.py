"""Saving an adapter, or any folder of files, all or nothing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft import PeftModel


def save_adapter(model: PeftModel, folder: str | os.PathLike, **kwargs: Any) -> Path:
    """`model.save_pretrained(folder, **kwargs)`, with `folder` never left half written.

    `save_pretrained` writes into its folder file by file, so a crash halfway (a full disk, a
    killed job) leaves a truncated adapter in place of the previous one. Here the adapter is
    written to the sibling `<folder>.partial` and swapped in by renames once complete: until then
    `folder` keeps the previous adapter whole (during the swap itself, in `<folder>.previous`).

    Returns:
        The folder written.
    """
    return write_folder_atomic(folder, lambda partial: model.save_pretrained(partial, **kwargs))


def write_folder_atomic(folder: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(partial)` to fill the fresh sibling folder `<folder>.partial`, then swap it in
    for `folder` by renames. Until then `folder` keeps its previous contents whole (during the
    swap itself, in `<folder>.previous`); a failing `write` leaves it untouched.

    Returns:
        The folder written.
    """
    final = Path(folder)
    partial = final.with_name(final.name + ".partial")
    previous = final.with_name(final.name + ".previous")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)

    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(partial, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final
