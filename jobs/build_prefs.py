"""`nsalign build-prefs CONFIG [key=value ...]`: a preference dataset from a prompt file.

For every prompt: G samples from the policy (rollout pool), every configured reward scores them
(reward pool), a named strategy picks (chosen, rejected) pairs (rollout/pairs.py), and the pairs are
written as Parquet shards in the format of rollout/prefs_format.py. Defaults follow NextStep-1:
20K Pick-a-Pic prompts, 16 samples, ImageReward primary, winner from the top 4, loser from the rest.

Exactly once: the prompt list is cut into fixed shards of `prompts_per_shard` prompts; a shard file
is written atomically, so "the file exists" means "done". Re-running the same command skips the
shards that exist and redoes the others; a sample depends only on (prompt id, index, seed, weights)
and pairs on (seed, prompt id), so a redone shard is identical. A rollout worker that dies is
replaced and its shards re-run on the others (core/pools.py). The driver holds only the shards in
flight, so memory does not grow with the number of prompts.

Self-CoT (`sampling.self_cot: true`, `sampling.cot.*`): each of the G samples first writes its own
reasoning, then its image; the rewards still score the images alone, pairs are ranked as above, and each
row also stores both reasonings (text, token ids, whether a stop token ended them; prefs_format.py). The
reasoning depends only on the sample's seed too, so a redone shard has the same texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from base_model.checkpoint import load_config as load_model_config
from base_model.checkpoint import verify_model_spec
from base_model.sampler import SamplingConfig
from base_model.sequence import check_sequence_fits, model_max_positions, prompt_tokenizer, truncation_note
from core.errors import ConfigError, UserError
from core.files import atomic_write, atomic_write_text, lock_dir, remove_partial_writes
from core.formats import shard_name
from core.pools import make_pool
from core.runs import MetricsLogger, prepare_run_dir
from core.schema import load_config, to_dict
from rewards.base import RewardsConfig, reward_table
from rewards.worker import RewardWorker
from rollout.batch import RolloutBatch
from rollout.pairs import PairConfig, prompt_rng, select_pairs
from rollout.prefs_format import DATA_DIR, MANIFEST, pairs_table, png_bytes
from rollout.prompts import PromptSourceConfig, load_prompts
from rollout.worker import RolloutConfig, RolloutWorker


@dataclass
class BuildPrefsConfig:
    out_dir: str = "runs/prefs"
    model: str = "tiny"  # checkpoint directory (published layout) or a random preset (tiny, mid)
    prompts: PromptSourceConfig = field(default_factory=PromptSourceConfig)
    samples_per_prompt: int = 16
    prompts_per_shard: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    seed: int = 0  # run seed: sample seeds and pair draws derive from it and the prompt id
    tensorboard: bool = False
    wandb: bool = False

    def validate(self, where: str = "config") -> None:
        if self.samples_per_prompt < 1 or self.prompts_per_shard < 1:
            raise ConfigError(f"{where}: samples_per_prompt and prompts_per_shard must be >= 1")
        self.sampling.validate(f"{where}.sampling")
        self.rollout.check_attention(self.sampling, where)
        self.pairs.check_group(self.samples_per_prompt, f"{where}.pairs")
        names = [r.name for r in self.rewards.rewards]
        for key, name in [("primary", self.pairs.primary)] + [("agreement_rewards", n) for n in
                                                              self.pairs.agreement_rewards]:  # fmt: skip
            if name not in names and name != "composite":
                raise ConfigError(f"{where}.pairs.{key}: {name!r} is not a configured reward ({', '.join(names)})")
        if self.pairs.primary == "composite" and any(r.normalize.kind == "running" for r in self.rewards.rewards):
            # running statistics depend on the order shards finish in: pairs would not be reproducible
            raise ConfigError(f"{where}.pairs.primary: 'composite' cannot rank with running-normalised rewards")
        if not self.model:
            raise ConfigError(f"{where}.model: required (a checkpoint directory or a preset)")
        size = (self.sampling.image_size,) * 2
        check_sequence_fits(self.sampling.max_prompt_tokens, size, model_max_positions(self.model),
                            f"{where}.sampling.max_prompt_tokens", text_tokens=self.sampling.text_tokens)  # fmt: skip

    @property
    def images_per_shard(self) -> int:
        return self.prompts_per_shard * self.samples_per_prompt


def check_inputs(config: BuildPrefsConfig):
    """Everything that can be checked before any output exists: prompts, model and reward files."""
    prompts = load_prompts(config.prompts.path, config.prompts.field, config.prompts.limit)
    for spec in config.rewards.rewards:
        for f in spec.family_config(spec.name).files():
            if not Path(f.path).is_file():
                raise UserError(f"reward '{spec.name}': {f.path} missing (expected {f.expected}; from {f.source})")
    if Path(config.model).exists() or "/" in config.model:
        load_model_config(config.model)  # missing directory or config.json -> CheckpointError naming it
    verify_model_spec(config.model)  # every shard's header too: a corrupt one would kill the workers as they start
    return prompts


def prepare_out_dir(config: BuildPrefsConfig) -> Path:
    """Create the output directory, or reopen it for a resume (same config, except where to run)."""
    out = Path(config.out_dir)
    resolved = to_dict(config)
    defaults = to_dict(BuildPrefsConfig())
    for d in (resolved, defaults):  # workers and devices may change between attempts; outputs do not
        d["rollout"].pop("pool")
        d["rewards"].pop("pool")
    run = prepare_run_dir(out.parent, out.name, resolved, defaults=defaults)
    (run / DATA_DIR).mkdir(exist_ok=True)
    remove_partial_writes(run / DATA_DIR)  # shards being written when the last attempt died
    return run


def text_fields(batch: RolloutBatch, i: int, side: str) -> dict:
    """Sample i's reasoning as the Self-CoT columns of one side ('chosen' / 'rejected') of a row."""
    n = int(batch.text.lengths[i])
    return {f"{side}_text": batch.texts[i], f"{side}_text_ids": batch.text.ids[i, :n].numpy(),
            f"{side}_text_stopped": bool(batch.text.stopped[i])}  # fmt: skip


def shard_rows(
    config: BuildPrefsConfig, batch: RolloutBatch, scores: dict[str, np.ndarray], sampling_json: str, checkpoint: str
) -> list[dict]:
    """One shard's rollouts + per-reward scores [B] -> pair rows (prefs_format.pairs_schema)."""
    g = config.samples_per_prompt
    rows = []
    for p in range(len(batch) // g):
        group = slice(p * g, (p + 1) * g)
        table = {name: s[group] for name, s in scores.items()}  # name -> [G]
        prompt_id = batch.prompt_ids[p * g]
        pairs = select_pairs(config.pairs, table, prompt_rng(config.seed, prompt_id))
        for k, (w, l) in enumerate(pairs):
            i, j = p * g + w, p * g + l
            rows.append({
                "prompt_id": prompt_id, "prompt": batch.prompts[i], "pair_index": k,
                "chosen_image": png_bytes(batch.images[i]), "rejected_image": png_bytes(batch.images[j]),
                "chosen_tokens": batch.tokens[i].float().numpy(), "rejected_tokens": batch.tokens[j].float().numpy(),
                "chosen_scores": {n: float(s[i]) for n, s in scores.items()},
                "rejected_scores": {n: float(s[j]) for n, s in scores.items()},
                "chosen_reward": float(table[config.pairs.primary][w]),
                "rejected_reward": float(table[config.pairs.primary][l]),
                "chosen_seed": int(batch.seeds[i]), "rejected_seed": int(batch.seeds[j]),
                "chosen_sample_index": w, "rejected_sample_index": l,
                "strategy": config.pairs.strategy, "sampling": sampling_json, "checkpoint": checkpoint,
                "policy_version": batch.policy_version,
            })  # fmt: skip
            if config.sampling.self_cot:
                rows[-1] |= text_fields(batch, i, "chosen") | text_fields(batch, j, "rejected")
    return rows


def write_shard(run: Path, index: int, rows: list[dict], reward_names: list[str], self_cot: bool = False) -> None:
    """Atomically: a temporary file in the same directory, then rename (an empty shard still counts)."""
    table = pairs_table(rows, reward_names, self_cot)
    atomic_write(run / DATA_DIR / shard_name(index), lambda tmp: pq.write_table(table, tmp))


def run_build_prefs(config: BuildPrefsConfig) -> Path:
    """The job. Returns the output directory."""
    prompts = check_inputs(config)
    texts, limit = [p.text for p in prompts], config.sampling.max_prompt_tokens  # tokenizer read before any output
    note = truncation_note("build-prefs", "sampling.max_prompt_tokens", prompt_tokenizer(config.model), texts, limit)
    shards = [prompts[s : s + config.prompts_per_shard] for s in range(0, len(prompts), config.prompts_per_shard)]
    with lock_dir(config.out_dir, "build-prefs"):  # held for the job's life
        run = prepare_out_dir(config)
        todo = [i for i in range(len(shards)) if not (run / DATA_DIR / shard_name(i)).is_file()]
        done_prompts = len(prompts) - sum(len(shards[i]) for i in todo)
        reward_names = [r.name for r in config.rewards.rewards] + ["composite"]
        rp, wp = config.rollout.pool, config.rewards.pool
        print(f"build-prefs: {len(prompts)} prompts x {config.samples_per_prompt} samples = "
              f"{len(prompts) * config.samples_per_prompt} images in {len(shards)} shards "
              f"of {config.prompts_per_shard} "
              f"prompts ({len(shards) - len(todo)} already done); rollout {rp.kind} x {rp.num_workers}, "
              f"rewards {wp.kind} x {wp.num_workers} -> {run}")  # fmt: skip
        if note:
            print(note)
        if config.sampling.self_cot:
            print(f"build-prefs: Self-CoT: each sample writes up to {config.sampling.cot.max_text_tokens} reasoning "
                  f"tokens before its image (template {config.sampling.cot.template!r})")  # fmt: skip

        checkpoint = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
        sampling_json = json.dumps(dataclasses.asdict(config.sampling), sort_keys=True)
        logger = MetricsLogger(run, tensorboard=config.tensorboard, wandb=config.wandb)
        if todo:
            worker_kwargs = dict(model=config.model, sampling=config.sampling, device=config.rollout.device,
                                 dtype=config.rollout.dtype, micro_batch_samples=config.rollout.micro_batch_samples,
                                 run_seed=config.seed, num_threads=config.rollout.num_threads)  # fmt: skip
            rollout_pool = make_pool(RolloutWorker, (), config.rollout.pool, worker_kwargs)
            reward_pool = make_pool(RewardWorker, (config.rewards,), config.rewards.pool)
            progress = tqdm(total=len(prompts), initial=done_prompts, unit="prompt", desc="build-prefs", smoothing=0.1)
            # Stage 1 streams rollouts as they finish; stage 2 scores each on the reward pool; the driver
            # picks pairs and writes the shard. Inputs are read lazily: only the shards in flight are held.
            in_flight: dict[int, tuple[int, float, object]] = {}  # reward-call index -> (shard, start, batch)
            started, new_prompts = time.time(), 0

            def rollouts():
                calls = ((shards[i], config.samples_per_prompt) for i in todo)
                for n, (k, batch) in enumerate(rollout_pool.imap_unordered("rollout", calls)):
                    in_flight[n] = (todo[k], time.time(), batch)
                    yield batch.images, batch.prompts

            try:
                for n, output in reward_pool.imap_unordered("score", rollouts()):
                    shard, _, batch = in_flight.pop(n)
                    scores = reward_table(output, reward_names)
                    rows = shard_rows(config, batch, scores, sampling_json, checkpoint)
                    write_shard(run, shard, rows, reward_names, config.sampling.self_cot)
                    progress.update(len(shards[shard]))
                    done_prompts += len(shards[shard])
                    metrics = {f"reward/{name}/mean": float(s.mean()) for name, s in scores.items()}
                    new_prompts += len(shards[shard])
                    gaps = [r["chosen_reward"] - r["rejected_reward"] for r in rows]
                    metrics.update({
                        "prefs/pairs": len(rows), "prefs/done_prompts": done_prompts,
                        "prefs/primary_gap": float(np.mean(gaps)) if gaps else 0.0,
                        "time/images_per_s": new_prompts * config.samples_per_prompt / max(time.time() - started, 1e-9),
                    })  # fmt: skip
                    if batch.text is not None:
                        metrics.update(text_metrics(batch))
                    logger.log(shard, metrics)
            finally:
                progress.close()
                rollout_pool.shutdown()
                reward_pool.shutdown()
        logger.close()
        manifest = write_manifest(run, config, len(prompts), len(shards), reward_names, checkpoint)
        print(f"build-prefs: {manifest['num_pairs']} pairs from {manifest['num_prompts']} prompts in {run / DATA_DIR}")
    return run


def text_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Reasoning lengths of a shard's samples and the share a stop token ended (the rest hit max_text_tokens)."""
    return {"text/num_tokens_mean": float(batch.text.lengths.float().mean()),
            "text/stopped_frac": float(batch.text.stopped.float().mean())}  # fmt: skip


def write_manifest(
    run: Path, config: BuildPrefsConfig, num_prompts: int, num_shards: int, reward_names: list[str], checkpoint: str
) -> dict:
    """Counts read back from the shard files themselves, the config and the provenance."""
    files = [run / DATA_DIR / shard_name(i) for i in range(num_shards)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(f"shards missing after the run: {missing[:5]}")
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    manifest = {
        "complete": True, "num_prompts": num_prompts, "num_shards": num_shards, "num_pairs": int(sum(counts)),
        "samples_per_prompt": config.samples_per_prompt, "num_images_sampled": num_prompts * config.samples_per_prompt,
        "rewards": reward_names, "primary": config.pairs.primary, "strategy": config.pairs.strategy,
        "self_cot": config.sampling.self_cot,
        "sampling": dataclasses.asdict(config.sampling), "checkpoint": checkpoint,
        "shards": [{"file": f"{DATA_DIR}/{f.name}", "num_pairs": c} for f, c in zip(files, counts)],
        "config": to_dict(config),
    }  # fmt: skip

    atomic_write_text(run / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/prefs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prompts.limit=100 rollout.pool.kind=ray")


def run(args: argparse.Namespace) -> int:
    config = load_config(BuildPrefsConfig, args.config, args.overrides)
    if config.rollout.pool.kind == "ray" or config.rewards.pool.kind == "ray":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    run_build_prefs(config)
    return 0
