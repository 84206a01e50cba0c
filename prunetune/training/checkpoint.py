"""A distillation's checkpoint: everything a killed run needs to go on as if never stopped.

One file, `distill_state.pt`, in the run's checkpoint folder: the trained parameters (all of
the student's, or only its LoRA adapters), the optimizer and scheduler states, the progress
(steps, windows read, tokens, losses), the random-number generators, and what the run was
started with (its settings and its data's shape and fingerprint), so that a resume with
other settings or other data is refused instead of silently training something else. The
file is written to a temporary name and renamed into place, so a run killed while writing
leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.training.settings import DistillSettings

CHECKPOINT_FILE = "distill_state.pt"


@dataclass
class Progress:
    """How far a run has got: optimizer steps, windows read, tokens trained, loss per step."""

    step: int = 0
    windows: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)


def run_identity(settings: DistillSettings, windows: torch.Tensor) -> dict[str, Any]:
    """What a checkpoint must have been started with to be resumed by this run."""
    digest = hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()
    return {**asdict(settings), "data_shape": list(windows.shape), "data_sha256": digest}


def save_checkpoint(folder: str | Path, student: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: Progress, identity: dict[str, Any]) -> Path:
    """Write the run's state to `folder/distill_state.pt` atomically; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "trained": {n: p.detach() for n, p in student.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "rng": rng_state(),
        "identity": identity,
    }
    path = folder / CHECKPOINT_FILE
    tmp = folder / f".{CHECKPOINT_FILE}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(folder: str | Path, student: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, identity: dict[str, Any]) -> Progress | None:
    """Restore the run's state from `folder`, or return None when it holds no checkpoint.

    Raises ValueError, naming the field, when the checkpoint was written by a run with
    other settings or other data.
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    refuse_other_run(path, state["identity"], identity)
    load_trained(path, student, state["trained"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


def refuse_other_run(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise when the checkpoint's run differs from this one, naming the first difference."""
    for name in sorted(saved.keys() | current.keys()):
        if saved.get(name) != current.get(name):
            label = name if name.startswith("data_") else f"distill.{name}"
            raise ValueError(f"{path} was written by a run with {label} = {saved.get(name)!r}; "
                             f"this run has {current.get(name)!r}: use another checkpoint "
                             "folder, or the same settings and data")


def load_trained(path: Path, student: nn.Module, trained: dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint's trained parameters into the student's."""
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    if params.keys() != trained.keys():
        missing = sorted(params.keys() ^ trained.keys())
        raise ValueError(f"{path} trains other parameters than this student "
                         f"(first differing: {missing[0]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(trained[name])


def rng_state() -> dict[str, Any]:
    """The state of torch's random-number generators (CPU, and every GPU when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators `rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
