"""Run directories: resolved config, metrics (jsonl + optional TensorBoard / wandb offline), and
checkpoints `step_000120/` with a `latest` pointer written last and atomically.

    runs/<name>/config.yaml          the resolved config (a resumed run must match it)
    runs/<name>/metrics.jsonl        one JSON object per optimizer step, steps strictly increasing (an attempt
                                     skipped for a non-finite loss gets no row: the next row's
                                     `train/skipped_nonfinite` counts it)
    runs/<name>/step_000120/         model (published layout), engine state, trainer_state.json, rng_state.json
    runs/<name>/latest               text file naming the newest complete checkpoint
    runs/<name>/.lock                held (flock) by the job using the directory; readers ignore it

A checkpoint is written into `.step_000120.tmp-staging/` and renamed to `step_000120/` once complete, and
only then does `latest` move: a kill at any point leaves the checkpoint `latest` names as it was. What a
killed write leaves behind (`.NAME.tmp-*`, `.NAME.old-*`) is deleted when the next job takes the lock.

Trust: a run directory is data (it may be copied from elsewhere), and reading it back runs no code:
trainer_state.json and rng_state.json are JSON, the model is safetensors, and the DeepSpeed engine state
(`engine/`, torch pickles) is loaded by `alignment.learner` with weights_only=True and an allow-list of
three plain DeepSpeed types. The pickled `rng_state.pt` of earlier versions is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from core.errors import CheckpointError, UserError
from core.files import atomic_write_text, remove_partial_writes, replace_dir, unwritable
from core.rng import capture_rng, restore_rng

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
RNG_STATE = "rng_state.json"  # every global generator as plain JSON (capture_rng)
LEGACY_RNG_STATE = "rng_state.pt"  # the pickle earlier versions wrote there: refused, never unpickled


# keys a resumed run may change: more steps; how to resume on another number of ranks
EXTENDABLE = ("steps", "learner.reshard_on_resume")


def without_keys(config: dict, paths: tuple[str, ...]) -> dict:
    """`config` without the dotted `paths` (absent ones ignored): {"a": {"b": 1, "c": 2}} - a.b -> {"a": {"c": 2}}."""
    out = json.loads(json.dumps(config))
    for path in paths:
        *parents, last = path.split(".")
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def with_defaults(config: dict, defaults: dict) -> dict:
    """`config` with every key it lacks taken from `defaults`, at any depth (its own values win)."""
    out = dict(config)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = with_defaults(out[key], value)
    return out


def prepare_run_dir(
    root: str | Path,
    name: str,
    resolved_config: dict,
    extendable: tuple[str, ...] = EXTENDABLE,
    defaults: dict | None = None,
) -> Path:
    """Create runs/<name>, or reopen it for a resume. A resume must use the same config, except for the
    `extendable` keys (dotted for nested ones: a run may be continued for more steps); config.yaml is then
    updated. A key the stored config lacks (written before that key existed) counts as its value in
    `defaults` (the config class's defaults: what the run then did), so an upgrade does not block a resume.
    Jobs call it under `lock_dir` of that directory: it also deletes what killed writes left there."""
    run = Path(root) / name
    for d in (run, *sorted(run.glob("step_*"))):
        remove_partial_writes(d)
    config_path = run / "config.yaml"
    text = yaml.safe_dump(resolved_config, sort_keys=True)
    if config_path.is_file():
        stored = with_defaults(yaml.safe_load(config_path.read_text()) or {}, defaults or {})
        old = without_keys(stored, extendable)
        new = without_keys(yaml.safe_load(text), extendable)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise UserError(
                f"{run} holds a run whose config differs in {', '.join(changed)}; "
                "resume with the same config or pick a new run name"
            )
        atomic_write_text(config_path, text)
        return run
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(run, e) from None
    atomic_write_text(config_path, text)
    return run


@dataclass
class TrainerState:
    """The progress record saved with every checkpoint (trainer_state.json): where a resumed run continues."""

    step: int = 0  # steps done (SFT, DPO: optimizer updates; GRPO: rollout batches)
    policy_version: int = 0  # weights version handed to rollout workers (GRPO)
    consumed_prompts: int = 0  # position in the prompt stream (GRPO) or the sample stream (SFT)
    consumed_pairs: int = 0  # position in the preference-pair stream (DPO)
    num_skipped_steps: int = 0  # non-finite losses skipped
    reward_state: dict = field(default_factory=dict)  # the reward workers' state (running normalisation; GRPO)

    @classmethod
    def from_json(cls, data: dict) -> TrainerState:
        """A trainer_state.json mapping, also as earlier versions wrote it (counters under `extra`)."""
        data = dict(data)
        data.update(data.pop("extra", None) or {})
        return cls(**data)


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / f"step_{step:06d}"


def staging_dir(run: Path, step: int) -> Path:
    """Where checkpoint `step` is written (by every rank) before finish_checkpoint renames it into place;
    hidden, so no reader takes it for a checkpoint."""
    return run / f".{checkpoint_dir(run, step).name}.tmp-staging"


def finish_checkpoint(run: Path, step_dir: Path, state: TrainerState, keep_last: int) -> None:
    """Write the trainer state and RNG into a fully written `step_dir` (normally `staging_dir`), rename it to
    step_<state.step>, then point `latest` at it."""
    atomic_write_text(step_dir / TRAINER_STATE, json.dumps(asdict(state), indent=2))
    atomic_write_text(step_dir / RNG_STATE, json.dumps(capture_rng()))
    final = checkpoint_dir(run, state.step)
    if step_dir != final:
        replace_dir(step_dir, final)  # never `latest`'s checkpoint: steps only grow past it
    atomic_write_text(run / LATEST, final.name + "\n")  # last: a crash before this keeps the old one
    prune_checkpoints(run, keep_last)


def nonfinite_stop(run: Path, error: Exception) -> UserError:
    """The one-line stop after `learner.max_consecutive_nonfinite` non-finite losses, naming where a rerun
    resumes (the skipped attempts saved nothing)."""
    last = latest_checkpoint(run)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
    return UserError(f"stopped: {error}; {where} (lower learner.lr or check the data, then rerun to resume)")


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
    """Checkpoint `step_dir`'s trainer state, restoring the generators saved with it. Both files are JSON;
    anything malformed is a CheckpointError naming the file. A legacy pickled `rng_state.pt` is never
    unpickled (a crafted pickle runs code when loaded, and torch's weights_only loader cannot read numpy's
    state without allow-listing numpy's array reconstruction): the resume stops, saying how to go on."""
    path = step_dir / TRAINER_STATE
    try:
        state = TrainerState.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a trainer state ({e})") from None
    rng = step_dir / RNG_STATE
    if rng.is_file():
        try:
            restore_rng(json.loads(rng.read_text()))
        except (ValueError, TypeError, OverflowError) as e:
            raise CheckpointError(f"{rng}: not an RNG state ({e})") from None
    elif (step_dir / LEGACY_RNG_STATE).is_file():
        raise CheckpointError(
            f"{step_dir / LEGACY_RNG_STATE}: RNG state in the old pickle format, which is never loaded (a pickle "
            "can run code); delete the file to resume without restoring the RNG (random draws then differ from "
            "an uninterrupted run)"
        )
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
        """One row: `step`, `time` and the metrics, every one named `area/name` (a programming error if not)."""
        unnamed = [k for k in metrics if "/" not in k.strip("/")]
        if unnamed:
            raise ValueError(f"metrics must be named area/name: {unnamed}")
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
