"""Saving an adapter all or nothing."""

from __future__ import annotations

import os
import shutil
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
    final = Path(folder)
    partial = final.with_name(final.name + ".partial")
    previous = final.with_name(final.name + ".previous")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, **kwargs)

    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(partial, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final
