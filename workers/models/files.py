"""Write files so that a reader never sees half of one: a temporary file beside the target,
then an atomic rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch


def replace_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path in ``path``'s folder, then rename it to ``path``."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def atomic_write(path: Path, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return replace_atomically(path, write)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    return replace_atomically(
        path, lambda tmp: save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
    )
