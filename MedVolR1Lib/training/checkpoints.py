"""Checkpoint discovery, exact resume and the training manifest that lets evaluation find the base model.

Exact resume is the HF Trainer's own (`resume_from_checkpoint`: weights or adapter, optimizer,
scheduler, RNG states, global step); this module only decides which checkpoint to resume from and
records what a saved adapter was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from ..volume import atomic_write

MANIFEST = "medvolr1_training.json"


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[str]:
    """Newest `checkpoint-N` folder with a trainer_state.json, or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-") and child.name.split("-")[-1].isdigit():
            if (child / "trainer_state.json").exists():
                found.append((int(child.name.split("-")[-1]), child))
    return str(max(found)[1]) if found else None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Optional[str]:
    """'auto' -> latest checkpoint if any; 'never' -> None; else a checkpoint folder that must exist."""
    if resume in ("", "never", "none", None):
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise CheckpointError(f"{path}: not a trainer checkpoint (no trainer_state.json); pass a checkpoint-N folder")
    return str(path)


def write_manifest(output_dir: str | os.PathLike, **info) -> Path:
    path = Path(output_dir) / MANIFEST
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1, default=str)))


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: unreadable training manifest ({exc})") from exc


def trained_step(checkpoint: str | os.PathLike) -> int:
    state = Path(checkpoint) / "trainer_state.json"
    if not state.exists():
        raise CheckpointError(f"{checkpoint}: no trainer_state.json")
    return int(json.loads(state.read_text())["global_step"])
