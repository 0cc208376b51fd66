"""`nsalign grpo CONFIG [key=value ...]`: online GRPO over NextStep-1's flow head (docs/algorithms.md §6-7).

Every step: P prompts from a seeded stream -> rollout pool (G images per prompt, head chains and
log-probs recorded) -> reward pool -> group advantages -> learner update(s) -> new weights
(policy_version + 1) to the rollout workers. A "step" is one rollout batch; with `inner_epochs: 1`
(strictly on-policy, NextStep-1.1) it is also one optimizer update.

Departures from Flow-GRPO: the learner re-scores each recorded chain in ONE teacher-forced pass
(NextStep-1.1), without CFG by default; the trained part is a mask over (token, head step) cells
(full / token_prefix / step_prefix / step_window, with the prefix/suffix alternation of arXiv
2601.02256); `timestep_fraction` masks the loss of the unchosen head steps but they are still
computed. With `train_part.soft_value_samples: C` (token_prefix only), a prefix update's return is
no longer a sample's own reward R but the soft value of its first `prefix` tokens (arXiv 2601.02256):
the rollout workers continue each prefix C times with fresh noise under the same policy, the reward
pool scores the C images, V = eta log mean_c exp(R_c / eta), and the group advantages are taken over V.

clip_eps bounds the ratio exp(log pi - log pi_old) of one (token, head step) cell. With
`sampling.logprob_reduction: mean` (published RL code) the log-ratio is averaged over the 64 latent
dims and the published range is 1e-4; with `sum` (the exact likelihood) the log-ratio is 64x larger,
so the same per-dim range is 64e-4. Leave clip_eps empty to get exactly that.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from alignment.learner import Learner, StepResult
from alignment.learner_config import LearnerConfig
from alignment.losses import group_advantages, keep_groups
from alignment.objectives import GrpoMicroBatch, grpo_objective, reference_means
from alignment.train_parts import GroupFilterConfig, TrainPartConfig, prefix_values, soft_value_phase, train_weights
from alignment.trainer import Trainer
from base_model.checkpoint import resolve_model, verify_model_spec
from base_model.model import NextStepModel
from base_model.sampler import SamplingConfig
from base_model.sequence import check_sequence_fits, model_max_positions, truncation_note
from core.errors import ConfigError
from core.pools import make_pool
from core.rng import sample_order
from core.schema import load_config
from rewards.base import RewardOutput, RewardsConfig, reward_metrics
from rewards.worker import RewardWorker, concat
from rollout.batch import RolloutBatch, continuation_seeds, rollout_seed
from rollout.prompts import Prompt, load_prompts
from rollout.worker import GrpoRolloutWorker, RolloutConfig, group_chunks, split_prompts

LATENT_DIM = 64


@dataclass
class GrpoConfig:
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"rollout_pool": "rollout.pool", "reward_pool": "rewards.pool"}

    run_name: str = "grpo"
    runs_root: str = "runs"
    model: str = "tiny"  # checkpoint directory or a random preset (tiny, mid)
    prompts: str = ""  # prompt file (.txt/.jsonl/.json/.tsv/.parquet)
    prompt_field: str = "prompt"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)  # its pool: the reward workers
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # its pool: the rollout workers
    steps: int = 100  # GRPO steps (rollout batches)
    prompts_per_step: int = 8  # P
    samples_per_prompt: int = 16  # G, the group size
    micro_batch_samples: int = 8  # samples per learner forward/backward
    inner_epochs: int = 1  # optimizer updates per rollout batch (1: strictly on-policy)
    clip_eps: float | None = None  # None: 1e-4 per latent dim (see the module docstring)
    beta: float = 0.04  # KL to the frozen reference; 0 skips the reference model
    # exact: KL summed over the 64 dims with the step's true variance; flow_grpo: flow_grpo's scale (mean
    # over dims, sde variance without dt: D / dt = 640x smaller at K = 10), where its published beta applies
    kl_scale: str = "exact"
    # group: each group's std; global_std: flow_grpo's std of all raw rewards of the step; batch: RMS of
    # the within-group-centred rewards; none: centred rewards only
    advantage_scale: str = "group"
    train_with_cfg: bool = False  # NextStep-1.1 trains without CFG
    timestep_fraction: float = 1.0  # share of head steps trained per step (DanceGRPO 0.6)
    group_filter: GroupFilterConfig = field(default_factory=GroupFilterConfig)
    train_part: TrainPartConfig = field(default_factory=TrainPartConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    checkpoint_every: int = 50
    keep_last: int = 3
    seed: int = 0
    tensorboard: bool = False
    wandb: bool = False

    def validate(self, where: str = "config") -> None:
        if not self.prompts:
            raise ConfigError(f"{where}.prompts: required (a prompt file)")
        if self.sampling.sde_kind == "ode":
            raise ConfigError(f"{where}.sampling.sde_kind: 'ode' has no log-probs; GRPO needs 'sde' or 'cps'")
        for name in ("steps", "prompts_per_step", "micro_batch_samples", "inner_epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"{where}.samples_per_prompt: a group needs >= 2 samples, got {self.samples_per_prompt}")
        self._validate_sizes(where)
        check_sequence_fits(self.sampling.max_prompt_tokens, (self.sampling.image_size,) * 2,
                            model_max_positions(self.model), f"{where}.sampling.max_prompt_tokens")  # fmt: skip
        if self.clip_eps is not None and self.clip_eps <= 0:
            raise ConfigError(f"{where}.clip_eps: must be > 0, got {self.clip_eps}")
        if self.beta < 0:
            raise ConfigError(f"{where}.beta: must be >= 0, got {self.beta}")
        if self.advantage_scale not in ("group", "global_std", "batch", "none"):
            raise ConfigError(
                f"{where}.advantage_scale: 'group', 'global_std', 'batch' or 'none', got {self.advantage_scale!r}"
            )
        if self.kl_scale not in ("exact", "flow_grpo"):
            raise ConfigError(f"{where}.kl_scale: 'exact' or 'flow_grpo', got {self.kl_scale!r}")
        if self.sampling.uses_cfg and not self.train_with_cfg:
            raise ConfigError(
                f"{where}.train_with_cfg: sampling.cfg_scale={self.sampling.cfg_scale} samples the guided policy, so "
                "its log-probs must be re-scored with both branches; set train_with_cfg: true (or cfg_scale: 1.0)"
            )
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ConfigError(f"{where}.timestep_fraction: must be in (0, 1], got {self.timestep_fraction}")
        if self.rollout.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"{where}.rollout.dtype: 'float32' or 'bfloat16', got {self.rollout.dtype!r}")
        running = [r.name for r in self.rewards.rewards if r.normalize.kind == "running"]
        if running and self.rewards.pool.num_workers > 1:
            raise ConfigError(
                f"{where}.rewards.pool.num_workers: running normalisation ({running[0]}) needs one reward worker, "
                "so that every score of a group is normalised by the same statistics"
            )
        self.train_part.check_grid(self.num_image_tokens, self.sampling.num_scored_steps, f"{where}.train_part")

    def _validate_sizes(self, where: str) -> None:
        total, mb, g = self.samples_per_step, self.micro_batch_samples, self.samples_per_prompt
        if total % mb:
            divisors = [d for d in range(1, total + 1) if total % d == 0 and (d % g == 0 or g % d == 0)]
            raise ConfigError(
                f"{where}.micro_batch_samples: {mb} does not split prompts_per_step x samples_per_prompt = "
                f"{self.prompts_per_step} x {g} = {total} samples; use one of {divisors}"
            )
        if mb % g and g % mb:
            raise ConfigError(
                f"{where}.micro_batch_samples: {mb} must hold whole groups of samples_per_prompt = {g} "
                f"or split one evenly (a multiple or a divisor of {g})"
            )

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def num_image_tokens(self) -> int:
        return (self.sampling.image_size // 16) ** 2

    @property
    def resolved_clip_eps(self) -> float:
        if self.clip_eps is not None:
            return self.clip_eps
        return 1e-4 if self.sampling.logprob_reduction == "mean" else 1e-4 * LATENT_DIM


def describe(cfg: GrpoConfig, num_prompts: int) -> str:
    """The derived sizes, printed at start."""
    s = cfg.sampling
    steps_per_update = cfg.samples_per_step // cfg.micro_batch_samples
    part = cfg.train_part
    soft = (f" (prefix return: soft value of {part.soft_value_samples} continuations, eta {part.soft_value_eta:g})"
            if part.soft_value_samples else "")  # fmt: skip
    return (
        f"grpo: {num_prompts} prompts; {cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples = "
        f"{cfg.samples_per_step} samples/step in up to {steps_per_update} micro batches of {cfg.micro_batch_samples}; "
        f"{cfg.inner_epochs} update(s)/step; {cfg.num_image_tokens} tokens x {s.num_head_steps} head steps "
        f"({s.time_grid} grid, {s.num_scored_steps} trained; {s.sde_kind}, log-prob {s.logprob_reduction}, "
        f"clip_eps {cfg.resolved_clip_eps:g}); "
        f"beta {cfg.beta:g} ({cfg.kl_scale} KL); "
        f"train part {part.kind}{soft}; {cfg.rollout.pool.num_workers} {cfg.rollout.pool.kind} rollout / "
        f"{cfg.rewards.pool.num_workers} {cfg.rewards.pool.kind} reward workers; {cfg.steps} steps"
    )


def precision_note(cfg: GrpoConfig) -> str | None:
    """A one-line warning when rollouts and the learner run in different dtypes, else None.

    The learner then re-scores each chain with other numerics than the sampler's, so the ratio is not
    1 on an untouched policy (bf16 rollouts, fp32 learner: ~3e-3 mean log-prob gap, ~11% of cells
    clipped before any update); `grpo/clip_frac_on_policy` and `grpo/logprob_diff` show how much.
    """
    learner = "bfloat16" if cfg.learner.bf16 else "float32"
    if cfg.rollout.dtype == learner:
        return None
    return (
        f"grpo: warning: rollout.dtype {cfg.rollout.dtype} but the learner runs in {learner} "
        f"(learner.bf16: {cfg.learner.bf16}); log-probs differ before any update, see grpo/clip_frac_on_policy"
    )


class GrpoTrainer(Trainer):
    """GRPO in the trainer shape: pools, policy, reference (`Learner(reference=True)`) and learner in setup;
    a step is one rollout batch -> rewards (-> soft values) -> `inner_epochs` updates -> new weights."""

    job = "grpo"

    def __init__(self, cfg: GrpoConfig):
        super().__init__(cfg)
        self.cfg: GrpoConfig = cfg
        self.rollout_pool = self.reward_pool = None  # started by setup

    def setup(self) -> None:
        """Prompts, pools, policy, reference and learner; nothing is written yet."""
        cfg = self.cfg
        self.prompts = load_prompts(cfg.prompts, cfg.prompt_field)  # bad input fails before the run dir exists
        print(describe(cfg, len(self.prompts)))
        if note := precision_note(cfg):
            print(note)
        verify_model_spec(cfg.model)  # config and shard headers, before the rollout workers load them
        r = cfg.rollout
        self.rollout_pool = make_pool(
            GrpoRolloutWorker,
            (cfg.model, cfg.sampling, r.device, r.dtype, r.micro_batch_samples, cfg.seed, r.num_threads),
            r.pool,
        )
        self.reward_pool = make_pool(RewardWorker, (cfg.rewards,), cfg.rewards.pool)
        torch.manual_seed(cfg.seed)
        self.bundle = resolve_model(cfg.model, seed=cfg.seed)
        # the reference: a frozen copy of the starting policy (LoRA: the adapters disabled); a resume loads
        # the policy's state after this, so the reference stays the starting model
        self.learner = Learner(self.bundle.model.train(), cfg.learner, reference=cfg.beta > 0)
        texts, limit = [p.text for p in self.prompts], cfg.sampling.max_prompt_tokens
        if note := truncation_note("grpo", "sampling.max_prompt_tokens", self.bundle.tokenizer, texts, limit):
            print(note)

    def opened(self, resumed_from: Path | None) -> None:
        if resumed_from is not None:
            self.reward_pool.call_all("load_state_dict", self.state.reward_state)
        self.sync_weights()  # rollout workers start from the learner's weights (fresh or resumed)

    def step(self) -> dict[str, float] | None:
        cfg, state = self.cfg, self.state
        times = {}
        t0 = time.perf_counter()
        batch = self.rollout(self.draw_prompts())
        times["rollout"] = (t1 := time.perf_counter()) - t0
        rewards = self.score(batch)
        times["reward"] = (t2 := time.perf_counter()) - t1
        values, value_metrics = None, {}
        if self.needs_soft_values():  # train_part.soft_value_samples: continue every prefix, score
            values, value_metrics = self.soft_values(batch)
            now = time.perf_counter()
            times["soft_value"], t2 = now - t2, now
        skipped_before = self.learner.num_skipped
        result = self.update(batch, rewards.scores, values)
        times["learn"] = (t3 := time.perf_counter()) - t2
        metrics = result.metrics
        if state.step == 0 and "grpo/clip_frac_on_policy" in metrics:  # once: the rollout/learner gap
            diff = metrics.get("grpo/logprob_diff", float("nan"))
            print(f"grpo: step 0, before any update: {metrics['grpo/clip_frac_on_policy']:.1%} of trained "
                  f"cells clipped, mean |log-prob diff| {diff:.2e}")  # fmt: skip
        state.consumed_prompts += cfg.prompts_per_step  # a skipped attempt passes its prompts over
        if self.learner.num_skipped > skipped_before and not result.updated:
            return None  # every update skipped for a non-finite loss: no step
        if result.updated:  # new weights, new version
            state.policy_version += 1
            self.sync_weights()
        times["sync"] = time.perf_counter() - t3
        total = sum(times.values())
        metrics.update(reward_metrics(rewards))
        metrics.update(value_metrics)
        metrics.update({f"time/{k}_s": v for k, v in times.items()})
        metrics.update({f"time/{k}_share": v / total for k, v in times.items()})
        metrics["samples/s"] = cfg.samples_per_step / total
        metrics["policy_version"] = float(state.policy_version)
        return metrics

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['reward/mean']:.4f}"}

    # -- the parts of a step, in order --------------------------------------------------------------

    def draw_prompts(self) -> list[Prompt]:
        order = sample_order(len(self.prompts), self.cfg.seed, self.state.consumed_prompts, self.cfg.prompts_per_step)
        return [self.prompts[i] for i in order]

    def rollout(self, prompts: list[Prompt]) -> RolloutBatch:
        seed = rollout_seed(self.cfg.seed, self.state.step)
        chunks = split_prompts(prompts, self.cfg.rollout.pool.num_workers)
        batch = RolloutBatch.concat(self.rollout_pool.map("rollout_step", [(c, self.cfg.samples_per_prompt, seed)
                                                                           for c in chunks]))  # fmt: skip
        if batch.policy_version != self.state.policy_version:
            raise RuntimeError(f"rollout used policy {batch.policy_version}, expected {self.state.policy_version}")
        return batch

    def score(self, batch: RolloutBatch) -> RewardOutput:
        return self._score(batch.images, batch.prompts, self.cfg.samples_per_prompt)

    def _score(self, images: torch.Tensor, prompts: list[str], group: int) -> RewardOutput:
        """Rewards of images [N, 3, H, W], split over the reward workers in whole groups of `group`."""
        chunks = group_chunks(len(prompts), group, self.cfg.rewards.pool.num_workers)
        return concat(self.reward_pool.map("score", [(images[s:e], prompts[s:e]) for s, e in chunks]))

    def needs_soft_values(self) -> bool:
        """Whether an update of this step trains the prefix on its soft value (continuations needed)."""
        first = self.state.step * self.cfg.inner_epochs
        return any(soft_value_phase(self.cfg.train_part, first + e) for e in range(self.cfg.inner_epochs))

    def soft_values(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Soft values [B] of every sample's token prefix from C continuations drawn by the rollout pool
        (the current policy, fresh seeds) and scored by the reward pool; with their metrics."""
        part, b = self.cfg.train_part, len(batch)
        c = part.soft_value_samples
        seeds = continuation_seeds(batch.seeds, c, self.cfg.seed, self.state.step).flatten()  # [B*C], sample-major
        prompts = [p for p in batch.prompts for _ in range(c)]
        prefixes = batch.tokens[:, : part.prefix].repeat_interleave(c, dim=0)  # [B*C, m, 64]
        group = self.cfg.samples_per_prompt * c  # a prompt's continuations stay on one worker
        chunks = group_chunks(b * c, group, self.cfg.rollout.pool.num_workers)
        images = torch.cat(self.rollout_pool.map("continue_prefixes", [(prompts[s:e], prefixes[s:e], seeds[s:e])
                                                                       for s, e in chunks]))  # fmt: skip
        rewards = self._score(images, prompts, group).scores.reshape(b, c)  # [B, C]
        return prefix_values(rewards, part.soft_value_eta)

    def update(self, batch: RolloutBatch, rewards: torch.Tensor, values: torch.Tensor | None = None) -> StepResult:
        """Per update: returns (rewards [B], or the prefixes' soft values [B] in a soft-value prefix
        update), advantages per group, group filter, then the learner step; `inner_epochs` updates.
        `updated`: whether any of them changed the weights."""
        cfg, g = self.cfg, self.cfg.samples_per_prompt
        t, k = batch.tokens.shape[1], batch.log_probs.shape[2]
        metrics, tried, updated = {}, False, False
        for epoch in range(cfg.inner_epochs):
            index = self.state.step * cfg.inner_epochs + epoch
            returns = values if values is not None and soft_value_phase(cfg.train_part, index) else rewards
            grouped = returns.reshape(-1, g)  # [P, G]
            keep = keep_groups(grouped, cfg.group_filter.min_std, cfg.group_filter.max_mean)  # [P]
            metrics["grpo/zero_std_group_ratio"] = float((grouped.std(dim=1, unbiased=False) < 1e-8).float().mean())
            metrics["grpo/kept_groups"] = float(keep.sum())
            if not keep.any():
                continue
            # over every group of the step, then the kept ones: global_std's std is of all the step's rewards
            advantages = group_advantages(grouped, scale=cfg.advantage_scale)[keep].flatten()  # [B_kept]
            kept = batch.select(keep.repeat_interleave(g).nonzero().flatten())
            n, mb = len(kept), cfg.micro_batch_samples
            num_micro = -(-n // mb)
            weights = train_weights(cfg.train_part, t, k, index, cfg.timestep_fraction, cfg.seed)
            micro = [
                GrpoMicroBatch(kept.select(list(range(s, min(s + mb, n)))), advantages[s : s + mb], weights,
                               scale=min(mb, n - s) * num_micro / n)
                for s in range(0, n, mb)
            ]  # fmt: skip
            result = self.learner.step(micro, self.loss_fn)
            out = result.metrics
            if tried:  # keep the first update's on-policy health check; the rest from the last update
                out.pop("grpo/logprob_diff", None)
                out.pop("grpo/clip_frac_on_policy", None)
            elif "grpo/clip_frac" in out:  # before any update: nonzero means rollout and learner disagree
                out["grpo/clip_frac_on_policy"] = out["grpo/clip_frac"]
            tried, updated = True, updated or result.updated
            metrics.update(out)
            metrics["grpo/trained_cells"] = float((weights > 0).float().mean())
        return StepResult(updated=updated, metrics=metrics)

    def loss_fn(self, model: NextStepModel, mb: GrpoMicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, bundle = self.cfg, self.bundle
        ref_means = None
        if cfg.beta > 0:  # the reference pass first: under LoRA it runs with the adapters off
            with self.learner.reference() as ref:
                ref_means = reference_means(ref, bundle.tokenizer, bundle.ids, mb.batch, cfg.train_with_cfg)
        loss, metrics = grpo_objective(
            model, None, bundle.tokenizer, bundle.ids, mb.batch, mb.advantages, mb.weights,
            cfg.resolved_clip_eps, cfg.beta, cfg.train_with_cfg, cfg.kl_scale, ref_means=ref_means,
        )  # fmt: skip
        return loss * mb.scale, metrics

    def sync_weights(self) -> None:
        """Broadcast the learner's weights as `state.policy_version` to every rollout worker."""
        weights = self.learner.policy_weights()
        self.rollout_pool.call_all("load_weights", weights, self.state.policy_version, sticky=True)

    def save_extra(self, step_dir: Path) -> None:
        reward_states = self.reward_pool.call_all("state_dict")
        self.state.reward_state = reward_states[0]  # one worker when a normalisation keeps state

    def cleanup(self) -> None:
        super().cleanup()
        for pool in (self.rollout_pool, self.reward_pool):
            if pool is not None:
                pool.shutdown()


def run_grpo(cfg: GrpoConfig) -> Path:
    """The GRPO job. Returns the run directory."""
    return GrpoTrainer(cfg).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/grpo/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 learner.lr=1e-5")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(GrpoConfig, args.config, args.overrides)
    out = run_grpo(cfg)
    print(f"grpo: done; checkpoints in {out}")
    return 0
