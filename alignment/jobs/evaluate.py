"""`nsalign evaluate CONFIG [key=value ...]`: checkpoints x held-out prompts x fixed seeds -> scores.

Every checkpoint samples the same prompts with the same per-sample seeds (rollout.batch.sample_seed of
prompt id, sample index and `seed`) and the same sampler settings, so any two checkpoints' scores are
paired row by row. Every configured reward scores every image; a thumbnail (PNG) is kept per image.

    <out>/config.yaml                         the evaluation settings (a re-run must match them)
    <out>/scores/<checkpoint>/shard-000000.parquet   one file per (checkpoint, block of prompts)
    <out>/eval.json                           checkpoints (name -> path), prompts, rewards, sampler

Like build-prefs, a shard is written atomically, so "the file exists" means "scored": re-running
skips it, and adding checkpoints to the config scores only the new ones. Rollouts run on the rollout
pool (in-process or Ray), scores on the reward pool.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from base_model.errors import ConfigError, UserError
from base_model.sampler import SamplingConfig
from base_model.schema import load_config, to_dict
from base_model.sequence import check_sequence_fits, model_max_positions, prompt_tokenizer, truncation_note
from rewards.base import RewardsConfig
from rollout.build_prefs import PromptSourceConfig, RolloutConfig
from rollout.prefs_format import shard_name

PRESETS = ("tiny", "mid")
SCORES_DIR = "scores"
MANIFEST = "eval.json"


@dataclass
class EvalSettings:
    """What every checkpoint is evaluated on; identical for all of them (paired comparisons)."""

    prompts: PromptSourceConfig = field(
        default_factory=lambda: PromptSourceConfig(path="prompts/pickscore_test.txt", limit=200)
    )
    samples_per_prompt: int = 4
    prompts_per_shard: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    seed: int = 1234  # sample seeds derive from it and the prompt id: the same for every checkpoint
    thumbnail_size: int = 128  # pixels per side of the kept thumbnails (never upscaled)

    def validate(self, where: str = "config") -> None:
        if self.samples_per_prompt < 1 or self.prompts_per_shard < 1:
            raise ConfigError(f"{where}: samples_per_prompt and prompts_per_shard must be >= 1")
        if self.thumbnail_size < 8:
            raise ConfigError(f"{where}.thumbnail_size: must be >= 8, got {self.thumbnail_size}")
        self.sampling.validate(f"{where}.sampling")
        if any(r.normalize.kind == "running" for r in self.rewards.rewards):
            # running statistics depend on the order shards are scored in: scores would not be paired
            raise ConfigError(f"{where}.rewards: evaluation needs fixed normalisation (no 'running')")


@dataclass
class EvaluateConfig(EvalSettings):
    out_dir: str = "runs/eval"
    checkpoints: list[str] = field(default_factory=list)  # dirs, presets, or `name=dir` to name one; a run
    # dir means its `latest` checkpoint, `<run>/selected` the checkpoint `nsalign select` chose
    run_dir: str | None = None  # also every step_*/model of this run directory

    def validate(self, where: str = "config") -> None:
        super().validate(where)
        if not self.checkpoints and not self.run_dir:
            raise ConfigError(f"{where}.checkpoints: name at least one checkpoint (or set run_dir)")
        for spec in self.checkpoints:  # run directories are resolved (and read) later
            check_sequence_fits(
                self.sampling.max_prompt_tokens,
                (self.sampling.image_size,) * 2,
                model_max_positions(spec.split("=", 1)[-1]),
                f"{where}.sampling.max_prompt_tokens",
            )


def checkpoint_name(spec: str) -> str:
    """A short unique-ish label: the preset, or the directory name (its parent's for `.../model`)."""
    if spec in PRESETS:
        return spec
    path = Path(spec)
    return path.parent.name if path.name == "model" else path.name


def run_checkpoints(run_dir: str | Path) -> list[tuple[str, str]]:
    """(name, model dir) of every saved checkpoint of a run, in step order."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    steps = sorted(p for p in run.glob("step_*") if (p / "model" / "config.json").is_file())
    if not steps:
        raise UserError(f"{run}: no step_*/model checkpoints")
    return [(p.name, str(p / "model")) for p in steps]


def resolve_checkpoints(cfg: EvaluateConfig) -> list[tuple[str, str]]:
    """(name, spec) pairs from the config, names unique, every directory checked before anything runs."""
    from alignment.runs import model_dir_of
    from base_model.checkpoint import load_config as load_model_config

    pairs = [tuple(c.split("=", 1)) if "=" in c else (checkpoint_name(c), c) for c in cfg.checkpoints]
    pairs = [(name, model_dir_of(spec)) for name, spec in pairs]  # run dirs -> latest, `selected` files
    if cfg.run_dir:
        pairs += run_checkpoints(cfg.run_dir)
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"checkpoint name {dup[0]!r} is used twice; name them with `name=dir`")
    for name, spec in pairs:
        if not name or "/" in name:
            raise UserError(f"checkpoint name {name!r} must be non-empty and without '/'")
        if spec not in PRESETS:
            load_model_config(spec)  # missing directory or config.json -> CheckpointError naming it
    return pairs


def thumbnail_png(image, size: int) -> bytes:
    """uint8 [3, H, W] -> PNG bytes of at most size x size pixels."""
    from PIL import Image

    img = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    if img.width > size or img.height > size:
        img = img.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def rows_schema(reward_names: list[str]):
    import pyarrow as pa

    scores = pa.struct([(name, pa.float64()) for name in reward_names])
    return pa.schema([
        ("checkpoint", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
        ("sample_index", pa.int32()), ("seed", pa.int64()), ("scores", scores), ("thumbnail", pa.binary()),
    ])  # fmt: skip


def shard_rows(name: str, batch, scores: dict[str, np.ndarray], samples_per_prompt: int, size: int) -> list[dict]:
    """One scored rollout batch -> rows (one per image)."""
    return [
        {"checkpoint": name, "prompt_id": batch.prompt_ids[i], "prompt": batch.prompts[i],
         "sample_index": i % samples_per_prompt, "seed": int(batch.seeds[i]),
         "scores": {n: float(s[i]) for n, s in scores.items()}, "thumbnail": thumbnail_png(batch.images[i], size)}
        for i in range(len(batch))
    ]  # fmt: skip


def write_rows(path: Path, rows: list[dict], reward_names: list[str]) -> None:
    """Atomically: a temporary file next to `path`, then rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows, schema=rows_schema(reward_names)), tmp)
    os.replace(tmp, path)


def prepare_out_dir(settings: EvalSettings, out_dir: str | Path) -> Path:
    """Create the output directory or reopen it; the settings must match (pools may change)."""
    from alignment.runs import prepare_run_dir

    out = Path(out_dir)
    resolved = {f.name: to_dict(getattr(settings, f.name)) for f in dataclasses.fields(EvalSettings)}
    resolved["rollout"].pop("pool")
    resolved["rewards"].pop("pool")
    run = prepare_run_dir(out.parent, out.name, resolved, extendable=())
    for stale in (run / SCORES_DIR).glob("*/.*.tmp-*"):  # a shard being written when the last attempt died
        stale.unlink()
    return run


def check_inputs(settings: EvalSettings) -> list:
    """The held-out prompts, after checking every reward's weight files exist."""
    from rollout.prompts import load_prompts

    for spec in settings.rewards.rewards:
        for f in spec.family_config(spec.name).files():
            if not Path(f.path).is_file():
                raise UserError(f"reward '{spec.name}': {f.path} missing (expected {f.expected}; from {f.source})")
    p = settings.prompts
    return load_prompts(p.path, p.field, p.limit)


def check_names(out: Path, checkpoints: list[tuple[str, str]]) -> dict[str, str]:
    """Checkpoints already recorded under another path may not be scored under the same name."""
    old = json.loads((out / MANIFEST).read_text())["checkpoints"] if (out / MANIFEST).is_file() else {}
    new = {name: str(Path(spec).resolve()) if spec not in PRESETS else spec for name, spec in checkpoints}
    for name, path in new.items():
        if name in old and old[name] != path:
            raise UserError(f"{out}: checkpoint name {name!r} was evaluated from {old[name]}, not {path}")
    return {**old, **new}


def evaluate_checkpoints(settings: EvalSettings, out_dir: str | Path, checkpoints: list[tuple[str, str]]) -> Path:
    """The job: score every (checkpoint, shard) that is not on disk yet. Returns the output directory."""
    from tqdm.auto import tqdm

    from alignment.runs import lock_dir
    from base_model.checkpoint import verify_model_spec
    from rewards.worker import RewardWorker
    from rollout.pools import make_pool

    prompts = check_inputs(settings)  # prompt file and reward weight files, before anything is written
    for _, spec in checkpoints:  # shard headers too (select comes here as well): before any worker starts
        verify_model_spec(spec)
    note = checkpoints and truncation_note(  # the checkpoints compared share one tokenizer
        "evaluate", "sampling.max_prompt_tokens", prompt_tokenizer(checkpoints[0][1]), [p.text for p in prompts],
        settings.sampling.max_prompt_tokens,
    )  # fmt: skip
    with lock_dir(out_dir, "evaluate"):  # held while scores are written
        out = prepare_out_dir(settings, out_dir)
        recorded = check_names(out, checkpoints)
        per = settings.prompts_per_shard
        shards = [prompts[s : s + per] for s in range(0, len(prompts), per)]
        reward_names = [r.name for r in settings.rewards.rewards] + ["composite"]

        def path(name: str, index: int) -> Path:
            return out / SCORES_DIR / name / shard_name(index)

        todo = {name: [i for i in range(len(shards)) if not path(name, i).is_file()] for name, _ in checkpoints}
        done = sum(len(prompts) - sum(len(shards[i]) for i in todo[name]) for name, _ in checkpoints)
        print(f"evaluate: {len(checkpoints)} checkpoints x {len(prompts)} prompts x {settings.samples_per_prompt} "
              f"seeds, {len(shards)} shards each ({sum(len(shards) - len(t) for t in todo.values())} of "
              f"{len(shards) * len(checkpoints)} already scored) -> {out}")  # fmt: skip
        if note:
            print(note)
        if any(todo.values()):
            reward_pool = make_pool(RewardWorker, (settings.rewards,), settings.rewards.pool)
            progress = tqdm(total=len(checkpoints) * len(prompts), initial=done, unit="prompt", desc="evaluate")
            try:
                for name, spec in checkpoints:
                    if todo[name]:
                        progress.set_postfix(checkpoint=name)
                        score_checkpoint(
                            settings, name, spec, todo[name], shards, reward_pool, reward_names, path, progress
                        )
            finally:
                progress.close()
                reward_pool.shutdown()
        write_manifest(out, settings, recorded, len(prompts), reward_names)
    return out


def score_checkpoint(settings, name, spec, todo, shards, reward_pool, reward_names, path, progress) -> None:
    """Shards `todo` of one checkpoint: rollouts stream from its pool into the reward pool, then to disk."""
    from rollout.build_prefs import reward_table
    from rollout.pools import make_pool
    from rollout.worker import RolloutWorker

    r = settings.rollout
    worker_kwargs = dict(model=spec, sampling=settings.sampling, device=r.device, dtype=r.dtype,
                         micro_batch_samples=r.micro_batch_samples, run_seed=settings.seed,
                         num_threads=r.num_threads)  # fmt: skip
    rollout_pool = make_pool(RolloutWorker, (), r.pool, worker_kwargs)
    in_flight: dict[int, tuple[int, object]] = {}  # reward-call index -> (shard, batch)

    def rollouts():
        calls = ((shards[i], settings.samples_per_prompt) for i in todo)
        for n, (k, batch) in enumerate(rollout_pool.imap_unordered("rollout", calls)):
            in_flight[n] = (todo[k], batch)
            yield batch.images, batch.prompts

    try:
        for n, output in reward_pool.imap_unordered("score", rollouts()):
            shard, batch = in_flight.pop(n)
            scores = reward_table(output, reward_names)
            rows = shard_rows(name, batch, scores, settings.samples_per_prompt, settings.thumbnail_size)
            write_rows(path(name, shard), rows, reward_names)
            progress.update(len(shards[shard]))
    finally:
        rollout_pool.shutdown()


def write_manifest(out: Path, settings: EvalSettings, checkpoints: dict[str, str], num_prompts: int,
                   reward_names: list[str]) -> None:  # fmt: skip
    from alignment.runs import atomic_write_text

    manifest = {
        "checkpoints": checkpoints, "num_prompts": num_prompts, "samples_per_prompt": settings.samples_per_prompt,
        "rewards": reward_names, "seed": settings.seed, "sampling": dataclasses.asdict(settings.sampling),
        "scores_dir": SCORES_DIR,
    }  # fmt: skip
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))


def run_evaluate(cfg: EvaluateConfig) -> Path:
    return evaluate_checkpoints(cfg, cfg.out_dir, resolve_checkpoints(cfg))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/evaluate/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prompts.limit=50 'checkpoints=[tiny]'")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    out = run_evaluate(cfg)
    print(f"evaluate: scores in {out / SCORES_DIR}")
    return 0
