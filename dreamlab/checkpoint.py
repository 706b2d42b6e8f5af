"""Checkpoint files: atomic writes, safe loading, clear errors for corrupt or foreign files.

A checkpoint is a ``torch.save`` dict of tensors and plain Python values only, loaded with
``weights_only=True`` so that opening a file never runs code from it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dreamlab.export.atomic import atomic_write

CHECKPOINT_FORMAT = 1
_REQUIRED_KEYS = ("step", "config_json", "fingerprint", "renderer", "optimizer", "generator")
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message says which file and what to do."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    state = dict(state, format=CHECKPOINT_FORMAT)
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path | str, required: tuple[str, ...] = _REQUIRED_KEYS) -> dict[str, Any]:
    """Loads and sanity-checks a checkpoint. Raises CheckpointError with a one-line reason.

    ``required``: the fields the caller's checkpoints must have (default: a 3D training run's).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is corrupt: the file is empty; delete it and resume "
                              "from an earlier checkpoint, or start a new run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to unpickle means the file is unusable
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated (it cannot be read back); "
            "delete it to resume from an earlier checkpoint, or start a new run"
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in required):
        raise CheckpointError(f"{path} is not a dreamlab checkpoint (missing fields)")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {state.get('format')!r}; this dreamlab reads format "
            f"{CHECKPOINT_FORMAT}"
        )
    return state


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest step first."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
