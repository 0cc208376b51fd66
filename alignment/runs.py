"""Run directories: resolved config, metrics (jsonl + optional TensorBoard / wandb offline), and
checkpoints `step_000120/` with a `latest` pointer written last and atomically.

    runs/<name>/config.yaml          the resolved config (a resumed run must match it)
    runs/<name>/metrics.jsonl        one JSON object per logged step
    runs/<name>/step_000120/         model (published layout), engine state, trainer_state.json
    runs/<name>/latest               text file naming the newest complete checkpoint
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from base_model.errors import UserError

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
RNG_STATE = "rng_state.pt"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_run_dir(
    root: str | Path, name: str, resolved_config: dict, extendable: tuple[str, ...] = ("steps",)
) -> Path:
    """Create runs/<name>, or reopen it for a resume. A resume must use the same config, except for the
    top-level `extendable` keys (a run may be continued for more steps); config.yaml is then updated."""
    run = Path(root) / name
    cfg_path = run / "config.yaml"
    text = yaml.safe_dump(resolved_config, sort_keys=True)
    if cfg_path.is_file():
        old = yaml.safe_load(cfg_path.read_text()) or {}
        new = yaml.safe_load(text)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in extendable)
        if changed:
            raise UserError(
                f"{run} holds a run whose config differs in {', '.join(changed)}; "
                "resume with the same config or pick a new run name"
            )
        atomic_write_text(cfg_path, text)
        return run
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, text)
    return run


@dataclass
class TrainerState:
    step: int = 0  # optimizer updates done
    policy_version: int = 0  # weights version handed to rollout workers
    consumed_prompts: int = 0  # position in the prompt stream
    num_skipped_steps: int = 0  # non-finite losses skipped
    extra: dict = field(default_factory=dict)


def capture_rng() -> dict:
    return {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }  # fmt: skip


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / f"step_{step:06d}"


def finish_checkpoint(run: Path, step_dir: Path, state: TrainerState, keep_last: int) -> None:
    """Write the trainer state and RNG into a fully written `step_dir`, then point `latest` at it."""
    atomic_write_text(step_dir / TRAINER_STATE, json.dumps(asdict(state), indent=2))
    torch.save(capture_rng(), step_dir / RNG_STATE)
    atomic_write_text(run / LATEST, step_dir.name + "\n")  # last: a crash before this keeps the old one
    prune_checkpoints(run, keep_last)


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint `latest` names, or None for a fresh run. A dangling pointer is an error."""
    pointer = run / LATEST
    if not pointer.is_file():
        return None
    step_dir = run / pointer.read_text().strip()
    if not (step_dir / TRAINER_STATE).is_file():
        raise UserError(f"{pointer} names {step_dir.name}, which is missing or incomplete")
    return step_dir


def model_dir_of(spec: str) -> str:
    """A checkpoint spec -> a model directory: a run directory -> the model of its `latest` checkpoint;
    a run's `selected` file (nsalign select) -> what it names; anything else (a model dir, a preset)
    unchanged. Lets configs name "the end of that run" before the run exists."""
    path = Path(spec)
    if path.name == "selected" and path.is_file():
        target = path.read_text().strip()
        return target if Path(target).is_absolute() or target in ("tiny", "mid") else str(path.parent / target)
    if (path / LATEST).is_file():
        return str(latest_checkpoint(path) / "model")
    return spec


def load_trainer_state(step_dir: Path) -> TrainerState:
    data = json.loads((step_dir / TRAINER_STATE).read_text())
    state = TrainerState(**data)
    rng = step_dir / RNG_STATE
    if rng.is_file():
        restore_rng(torch.load(rng, weights_only=False))  # our own file: python/numpy RNG need pickles
    return state


def prune_checkpoints(run: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never the one `latest` names)."""
    if keep_last <= 0:
        return
    latest = (run / LATEST).read_text().strip() if (run / LATEST).is_file() else None
    steps = sorted(p for p in run.glob("step_*") if p.is_dir() and (p / TRAINER_STATE).is_file())
    for old in steps[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


class MetricsLogger:
    """Metrics named `area/name` to metrics.jsonl, and to TensorBoard / wandb (offline) when enabled."""

    def __init__(self, run: Path, tensorboard: bool = False, wandb: bool = False, project: str = "nextstep-align"):
        self.path = run / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run / "tensorboard"))
        if wandb:
            import wandb as wb

            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wb.init(project=project, name=run.name, dir=str(run), resume="allow", id=run.name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint we restart from (they will be redone)."""
        if not self.path.is_file():
            return
        rows = [r for r in self.path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        atomic_write_text(self.path, "".join(r + "\n" for r in rows))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_published(bundle, weights: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype | None = None) -> None:
    """Plain-model `weights` (`Learner.policy_weights()`: gathered under ZeRO-3, LoRA merged) into the
    published layout, with the bundle's tokenizer and VAE. Never the engine's module state: under
    ZeRO-3 its parameters are empty partitions."""
    from dataclasses import replace

    from base_model.checkpoint import save_checkpoint
    from base_model.model import NextStepModel

    with torch.device("meta"):
        plain = NextStepModel(bundle.model.config)
    plain.load_state_dict(weights, strict=True, assign=True)
    save_checkpoint(replace(bundle, model=plain), directory, dtype=dtype)
