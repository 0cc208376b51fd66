"""Checkpoints x held-out prompts x fixed seeds -> scores: what `nsalign evaluate` and `nsalign select` run.

Every checkpoint samples the same prompts with the same per-sample seeds (rollout.batch.sample_seed of
prompt id, sample index and `seed`) and the same sampler settings, so any two checkpoints' scores are
paired row by row. Every configured reward scores every image; a thumbnail (PNG) is kept per image
(rollout/eval_format.py). Re-running skips the shards on disk, and adding checkpoints scores only the new
ones. Rollouts run on the rollout pool (in-process or Ray), scores on the reward pool.

Self-CoT (issue 20): an entry may be sampled with Self-CoT (the model writes its reasoning, then the image;
sampling.cot says how) while the others are not; everything else, seeds included, stays the same, so one
checkpoint listed twice (with and without) gives paired rows. eval.json records which entries used it
and the `cot` settings; an entry's mode, like its path, may not change in an existing output directory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from base_model.checkpoint import verify_model_spec
from base_model.config import RANDOM_PRESETS
from base_model.sampler import SamplingConfig
from base_model.sequence import prompt_tokenizer, truncation_note
from base_model.text import CotConfig
from core.errors import ConfigError, UserError
from core.files import atomic_write_text, lock_dir, remove_partial_writes
from core.formats import shard_name
from core.pools import LocalPool, RayPool, make_pool
from core.runs import prepare_run_dir
from core.schema import to_dict
from rewards.base import RewardsConfig, reward_table
from rewards.worker import RewardWorker
from rollout.eval_format import MANIFEST, SCORES_DIR, shard_rows, write_rows
from rollout.prompts import Prompt, PromptSourceConfig, load_prompts
from rollout.worker import RolloutConfig, RolloutWorker


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
        self.rollout.check_attention(self.sampling, where)
        if any(r.normalize.kind == "running" for r in self.rewards.rewards):
            # running statistics depend on the order shards are scored in: scores would not be paired
            raise ConfigError(f"{where}.rewards: evaluation needs fixed normalisation (no 'running')")


def checkpoint_name(spec: str) -> str:
    """A short unique-ish label: the preset, or the directory name (its parent's for `.../model`)."""
    if spec in RANDOM_PRESETS:
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


def settings_dict(settings: EvalSettings) -> dict:
    """The EvalSettings fields of `settings` as plain data, without the pools (workers may change between runs)."""
    out = {f.name: to_dict(getattr(settings, f.name)) for f in dataclasses.fields(EvalSettings)}
    out["rollout"].pop("pool")
    out["rewards"].pop("pool")
    return out


def prepare_out_dir(settings: EvalSettings, out_dir: str | Path) -> Path:
    """Create the output directory or reopen it; the settings must match (pools may change). Which entries
    use Self-CoT and with what `cot` is checked per entry against eval.json instead (check_self_cot), so
    Self-CoT entries can join a directory scored without them. Settings a directory's config.yaml lacks (written
    before they existed) count as EvalSettings' defaults, as for every run directory (core/runs.py)."""
    out = Path(out_dir)
    resolved, defaults = settings_dict(settings), settings_dict(EvalSettings())
    run = prepare_run_dir(out.parent, out.name, resolved, extendable=("sampling.self_cot", "sampling.cot"),
                          defaults=defaults)  # fmt: skip
    for scores in (run / SCORES_DIR).glob("*"):  # shards being written when the last attempt died
        remove_partial_writes(scores)
    return run


def check_inputs(settings: EvalSettings) -> list[Prompt]:
    """The held-out prompts, after checking every reward's weight files exist."""
    for spec in settings.rewards.rewards:
        for f in spec.family_config(spec.name).files():
            if not Path(f.path).is_file():
                raise UserError(f"reward '{spec.name}': {f.path} missing (expected {f.expected}; from {f.source})")
    p = settings.prompts
    return load_prompts(p.path, p.field, p.limit)


def check_names(out: Path, old: dict, checkpoints: list[tuple[str, str]]) -> dict[str, str]:
    """Checkpoints already recorded (in eval.json `old`) under another path may not be scored under the same name."""
    recorded = old.get("checkpoints", {})
    new = {name: str(Path(spec).resolve()) if spec not in RANDOM_PRESETS else spec for name, spec in checkpoints}
    for name, path in new.items():
        if name in recorded and recorded[name] != path:
            raise UserError(f"{out}: checkpoint name {name!r} was evaluated from {recorded[name]}, not {path}")
    return {**recorded, **new}


def check_self_cot(out: Path, old: dict, names: list[str], cot_names: set[str], cot: CotConfig) -> list[str]:
    """The entries sampled with Self-CoT once this run is done. Like a changed config, an entry recorded in
    eval.json (`old`) with the other mode, or Self-CoT scores made with other `cot` settings, are refused."""
    recorded = set(old.get("self_cot", []))  # eval.json written before Self-CoT: none
    for name in names:
        if name in old.get("checkpoints", {}) and (name in recorded) != (name in cot_names):
            was, now = ("with", "without") if name in recorded else ("without", "with")
            raise UserError(f"{out}: checkpoint {name!r} was evaluated {was} Self-CoT, not {now}; give this entry "
                            "another name (`name=dir`) or use a new out_dir")  # fmt: skip
    if recorded and cot_names and old.get("cot") != dataclasses.asdict(cot):
        raise UserError(f"{out}: its Self-CoT entries ({', '.join(sorted(recorded))}) were sampled with other "
                        "sampling.cot settings (see eval.json `cot`); use the same ones or a new out_dir")  # fmt: skip
    return sorted(recorded | cot_names)


def evaluate_checkpoints(settings: EvalSettings, out_dir: str | Path, checkpoints: list[tuple[str, str]],
                         report_truncation: bool = True, self_cot: Collection[str] = ()) -> Path:  # fmt: skip
    """The job: score every (checkpoint, shard) that is not on disk yet. Returns the output directory.
    report_truncation=False: a later round over the same prompts (select's soups) does not repeat the count.
    self_cot: names of the entries sampled with Self-CoT (every entry when settings.sampling.self_cot)."""
    cot_names = {name for name, _ in checkpoints if settings.sampling.self_cot or name in self_cot}
    prompts = check_inputs(settings)  # prompt file and reward weight files, before anything is written
    for _, spec in checkpoints:  # shard headers too (select comes here as well): before any worker starts
        verify_model_spec(spec)
    note = report_truncation and checkpoints and truncation_note(  # the checkpoints compared share one tokenizer
        "evaluate", "sampling.max_prompt_tokens", prompt_tokenizer(checkpoints[0][1]), [p.text for p in prompts],
        settings.sampling.max_prompt_tokens,
    )  # fmt: skip
    with lock_dir(out_dir, "evaluate"):  # held while scores are written
        out = Path(out_dir)  # entries are checked first: a refused run leaves config.yaml as it was
        old = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
        recorded = check_names(out, old, checkpoints)
        recorded_cot = check_self_cot(out, old, [n for n, _ in checkpoints], cot_names, settings.sampling.cot)
        out = prepare_out_dir(settings, out)
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
        if cot_names:
            print(f"evaluate: sampled with Self-CoT (up to {settings.sampling.cot.max_text_tokens} reasoning "
                  f"tokens): {', '.join(n for n, _ in checkpoints if n in cot_names)}")  # fmt: skip
        if note:
            print(note)
        if any(todo.values()):
            reward_pool = make_pool(RewardWorker, (settings.rewards,), settings.rewards.pool)
            progress = tqdm(total=len(checkpoints) * len(prompts), initial=done, unit="prompt", desc="evaluate")
            try:
                for name, spec in checkpoints:
                    if todo[name]:
                        progress.set_postfix(checkpoint=name)
                        sampling = dataclasses.replace(settings.sampling, self_cot=name in cot_names)
                        score_checkpoint(settings, sampling, name, spec, todo[name], shards, reward_pool,
                                         reward_names, path, progress)  # fmt: skip
            finally:
                progress.close()
                reward_pool.shutdown()
        cot = dataclasses.asdict(settings.sampling.cot) if cot_names else old.get("cot")  # equal when both
        write_manifest(out, settings, recorded, len(prompts), reward_names, recorded_cot, cot)
    return out


def score_checkpoint(settings: EvalSettings, sampling: SamplingConfig, name: str, spec: str, todo: list[int],
                     shards: list[list[Prompt]], reward_pool: LocalPool | RayPool, reward_names: list[str],
                     path: Callable[[str, int], Path], progress: tqdm) -> None:  # fmt: skip
    """Shards `todo` of one checkpoint: rollouts stream from its pool into the reward pool, then to disk.
    `sampling` is settings.sampling with this entry's Self-CoT mode."""
    r = settings.rollout
    worker_kwargs = dict(model=spec, sampling=sampling, device=r.device, dtype=r.dtype,
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
                   reward_names: list[str], self_cot: list[str], cot: dict | None) -> None:  # fmt: skip
    """eval.json; `self_cot`: the entries sampled with Self-CoT, `cot`: their CotConfig (None: no such entry)."""
    manifest = {
        "checkpoints": checkpoints, "num_prompts": num_prompts, "samples_per_prompt": settings.samples_per_prompt,
        "rewards": reward_names, "seed": settings.seed, "sampling": dataclasses.asdict(settings.sampling),
        "self_cot": self_cot, "cot": cot, "scores_dir": SCORES_DIR,
    }  # fmt: skip
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
