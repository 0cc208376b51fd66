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

import fcntl
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from base_model.errors import CheckpointError, UserError

LATEST = "latest"
LOCK = ".lock"
TRAINER_STATE = "trainer_state.json"
RNG_STATE = "rng_state.json"  # every global generator as plain JSON (capture_rng)
LEGACY_RNG_STATE = "rng_state.pt"  # the pickle earlier versions wrote there: refused, never unpickled
RNG_FORMAT = 1


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def unwritable(path: Path, error: OSError) -> UserError:
    """One line for a directory that cannot be created or written (read-only, or a file in the way)."""
    return UserError(f"{path}: cannot create or write this directory ({error.strerror or error})")


@contextmanager
def lock_dir(path: str | Path, job: str, lock_name: str = LOCK) -> Iterator[Path]:
    """Create directory `path` if needed and hold an exclusive lock on `path/<lock_name>` for the block: a
    second job on the same directory stops at once, naming the holder's pid. The lock file stays (deleting it
    would let a third job lock a fresh file while the second holds the old one). flock locks belong to an open
    file: never take the same directory's lock twice in one process (it would fail, naming this pid)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
        fd = os.open(path / lock_name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise unwritable(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{path} is in use by {holder}; wait for that job to end or use another directory") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} (nsalign {job})\n".encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)  # a stale pid would name a job that no longer holds it
        os.close(fd)  # releases the lock


def prepare_run_dir(
    root: str | Path, name: str, resolved_config: dict, extendable: tuple[str, ...] = ("steps",)
) -> Path:
    """Create runs/<name>, or reopen it for a resume. A resume must use the same config, except for the
    top-level `extendable` keys (a run may be continued for more steps); config.yaml is then updated.
    Jobs call it under `lock_dir` of that directory: it also deletes what killed writes left there."""
    from base_model.checkpoint import remove_partial_writes

    run = Path(root) / name
    for d in (run, *sorted(run.glob("step_*"))):
        remove_partial_writes(d)
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
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(run, e) from None
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
    """Every global generator a job draws from, as plain JSON values (so reading it back runs no code):
    python's Mersenne Twister (version, 624 words + position, cached gauss), numpy's legacy RandomState
    (MT19937 keys, position, cached gaussian), torch's CPU generator and each CUDA device's (bytes, as hex)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "format": RNG_FORMAT,
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"bit_generator": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state().numpy().tobytes().hex(),
        "cuda": [s.cpu().numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
    }  # fmt: skip


def _words(value: object, count: int, what: str) -> list[int]:
    """`count` ints in [0, 2**32) (Mersenne Twister words), else ValueError naming `what`."""
    if not (isinstance(value, list) and len(value) == count):
        raise ValueError(f"{what}: expected a list of {count} integers")
    if not all(type(v) is int and 0 <= v < 2**32 for v in value):
        raise ValueError(f"{what}: expected integers in [0, 2**32)")
    return value


def _bytes(value: object, what: str) -> torch.Tensor:
    """A hex string -> uint8 tensor, else ValueError naming `what`."""
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a hex string")
    return torch.tensor(list(bytes.fromhex(value)), dtype=torch.uint8)


def restore_rng(state: dict) -> None:
    """Set every generator from a `capture_rng()` dict (or its JSON read back). Every field is checked first,
    so a malformed state raises ValueError naming the field and changes no generator."""
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise ValueError(f"format: expected {RNG_FORMAT}")
    py, npy = state.get("python"), state.get("numpy")
    if not isinstance(py, dict) or not isinstance(npy, dict):
        raise ValueError("expected 'python' and 'numpy' sections")
    internal = _words(py.get("state"), 625, "python.state")  # 624 words + the position
    if internal[-1] > 624:
        raise ValueError("python.state: position beyond 624")
    gauss = py.get("gauss_next")
    if type(py.get("version")) is not int or not (gauss is None or type(gauss) is float):
        raise ValueError("python: expected an int version and a float or null gauss_next")
    keys = _words(npy.get("keys"), 624, "numpy.keys")
    pos, has_gauss, cached = npy.get("pos"), npy.get("has_gauss"), npy.get("cached_gaussian")
    if npy.get("bit_generator") != "MT19937" or type(pos) is not int or not 0 <= pos <= 624:
        raise ValueError("numpy: expected bit_generator MT19937 and pos in [0, 624]")
    if has_gauss not in (0, 1) or type(cached) is not float:
        raise ValueError("numpy: expected has_gauss 0 or 1 and a float cached_gaussian")
    cpu = _bytes(state.get("torch"), "torch")
    if cpu.numel() != torch.get_rng_state().numel():
        raise ValueError(f"torch: expected {torch.get_rng_state().numel()} bytes, got {cpu.numel()}")
    cuda = state.get("cuda", [])
    if not isinstance(cuda, list):
        raise ValueError("cuda: expected a list")
    cuda = [_bytes(s, f"cuda[{i}]") for i, s in enumerate(cuda)]
    random.setstate((py["version"], tuple(internal), gauss))
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / f"step_{step:06d}"


def staging_dir(run: Path, step: int) -> Path:
    """Where checkpoint `step` is written (by every rank) before finish_checkpoint renames it into place;
    hidden, so no reader takes it for a checkpoint."""
    return run / f".{checkpoint_dir(run, step).name}.tmp-staging"


def finish_checkpoint(run: Path, step_dir: Path, state: TrainerState, keep_last: int) -> None:
    """Write the trainer state and RNG into a fully written `step_dir` (normally `staging_dir`), rename it to
    step_<state.step>, then point `latest` at it."""
    from base_model.checkpoint import replace_dir

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
        state = TrainerState(**json.loads(path.read_text()))
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
