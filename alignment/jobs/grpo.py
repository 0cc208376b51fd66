"""`nsalign grpo CONFIG [key=value ...]`: online GRPO over NextStep-1's flow head (algorithms.md §2-3).

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
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.grpo_parts import TrainPartConfig
from alignment.learner import LearnerConfig
from base_model.errors import ConfigError
from base_model.sampler import SamplingConfig
from base_model.schema import load_config, to_dict
from base_model.sequence import check_sequence_fits, model_max_positions, truncation_note
from rewards.base import RewardsConfig
from rollout.pools import PoolConfig

LATENT_DIM = 64


@dataclass
class RolloutConfig:
    device: str = "cpu"  # each rollout worker's device ("cuda" inside a Ray actor: its own GPU)
    dtype: str = "float32"  # float32 / bfloat16
    micro_batch_samples: int = 16  # samples per sampler call


@dataclass
class GroupFilterConfig:
    """NextStep-1.1: drop groups that carry no signal (std below min_std) or are already solved."""

    min_std: float = 1e-6
    max_mean: float | None = None


@dataclass
class GrpoConfig:
    run_name: str = "grpo"
    runs_root: str = "runs"
    model: str = "tiny"  # checkpoint directory or a random preset (tiny, mid)
    prompts: str = ""  # prompt file (.txt/.jsonl/.json/.tsv/.parquet)
    prompt_field: str = "prompt"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rollout_pool: PoolConfig = field(default_factory=PoolConfig)
    reward_pool: PoolConfig = field(default_factory=PoolConfig)
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
        if self.rollout.micro_batch_samples < 1:
            raise ConfigError(f"{where}.rollout.micro_batch_samples: must be >= 1")
        if self.rewards.pool != PoolConfig():
            raise ConfigError(f"{where}.rewards.pool: set the reward workers with the top-level reward_pool")
        running = [r.name for r in self.rewards.rewards if r.normalize.kind == "running"]
        if running and self.reward_pool.num_workers > 1:
            raise ConfigError(
                f"{where}.reward_pool.num_workers: running normalisation ({running[0]}) needs one reward worker, "
                "so that every score of a group is normalised by the same statistics"
            )
        self._validate_train_part(f"{where}.train_part")

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

    def _validate_train_part(self, where: str) -> None:
        part, k, t = self.train_part, self.sampling.num_scored_steps, self.num_image_tokens  # trainable steps
        if part.kind == "token_prefix" and not 1 <= part.prefix <= t:
            raise ConfigError(f"{where}.prefix: token_prefix needs 1..{t} image tokens, got {part.prefix}")
        if part.kind == "step_prefix" and not 1 <= part.prefix <= k:
            raise ConfigError(f"{where}.prefix: step_prefix needs 1..{k} head steps, got {part.prefix}")
        if part.kind == "step_window":
            if not 1 <= part.window <= k:
                raise ConfigError(f"{where}.window: needs 1..{k} head steps, got {part.window}")
            if not 0 <= part.window_start <= k - part.window:
                raise ConfigError(f"{where}.window_start: must be in 0..{k - part.window}, got {part.window_start}")
        if part.alternate:
            if part.kind == "full":
                raise ConfigError(f"{where}.alternate: needs a prefix or window kind (full has no suffix)")
            if part.prefix_updates < 1 or part.suffix_updates < 1:
                raise ConfigError(f"{where}: prefix_updates and suffix_updates must be >= 1")
        if part.alpha < 0:
            raise ConfigError(f"{where}.alpha: must be >= 0, got {part.alpha}")
        if part.soft_value_samples < 0:
            raise ConfigError(f"{where}.soft_value_samples: must be >= 0 (0: off), got {part.soft_value_samples}")
        if part.soft_value_samples and part.kind != "token_prefix":
            raise ConfigError(
                f"{where}.soft_value_samples: continuations need a trajectory prefix (kind token_prefix), "
                f"got kind {part.kind}"
            )
        if part.soft_value_eta <= 0:
            raise ConfigError(f"{where}.soft_value_eta: must be > 0, got {part.soft_value_eta}")

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


@dataclass
class GrpoMicroBatch:
    batch: object  # RolloutBatch of b samples
    advantages: torch.Tensor  # [b]
    weights: torch.Tensor  # [T, K]
    scale: float  # b * num_micro / num_samples: micro losses of unequal size average per sample


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
        f"train part {part.kind}{soft}; {cfg.rollout_pool.num_workers} {cfg.rollout_pool.kind} rollout / "
        f"{cfg.reward_pool.num_workers} {cfg.reward_pool.kind} reward workers; {cfg.steps} steps"
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


class GrpoTrainer:
    """The job's parts: pools, learner, reference, and the state a checkpoint saves."""

    def __init__(self, cfg: GrpoConfig, prompts: list):
        """Pools, policy, reference and learner; nothing is written yet."""
        from alignment.grpo_parts import GrpoRolloutWorker
        from alignment.learner import Learner
        from alignment.runs import TrainerState
        from base_model.checkpoint import resolve_model, verify_model_spec
        from rewards.worker import RewardWorker
        from rollout.pools import make_pool

        self.cfg, self.prompts = cfg, prompts
        verify_model_spec(cfg.model)  # config and shard headers, before the rollout workers load them
        self.rollout_pool = make_pool(
            GrpoRolloutWorker, (cfg.model, cfg.sampling, cfg.rollout.device, cfg.rollout.dtype,
                                cfg.rollout.micro_batch_samples, cfg.seed), cfg.rollout_pool,
        )  # fmt: skip
        self.reward_pool = make_pool(RewardWorker, (cfg.rewards,), cfg.reward_pool)
        torch.manual_seed(cfg.seed)
        self.bundle = resolve_model(cfg.model, seed=cfg.seed)
        self.ref_model = None
        if cfg.beta > 0:  # frozen copy of the starting policy (also on resume: state loads after this)
            self.ref_model = copy.deepcopy(self.bundle.model).eval().requires_grad_(False)
        self.learner = Learner(self.bundle.model.train(), cfg.learner)
        if self.ref_model is not None:
            dtype = torch.bfloat16 if cfg.learner.bf16 else torch.float32
            self.ref_model.place(device=next(self.learner.model.parameters()).device, dtype=dtype)
        self.state = TrainerState()
        self.logger = None  # opened by open_run

    def open_run(self, run: Path) -> None:
        """Resume from the run's `latest` checkpoint if any, open the metrics, hand weights to the workers."""
        from alignment.runs import MetricsLogger, latest_checkpoint, load_trainer_state

        self.run = run
        resume_from = latest_checkpoint(run)
        if resume_from is not None:
            self.learner.load_state(resume_from)
            self.state = load_trainer_state(resume_from)
            self.reward_pool.call_all("load_state_dict", self.state.extra.get("reward_state", {}))
            print(f"grpo: resumed from {resume_from.name} (step {self.state.step})")
        self.logger = MetricsLogger(run, tensorboard=self.cfg.tensorboard, wandb=self.cfg.wandb)
        self.logger.truncate_after(self.state.step)
        self.sync_weights()  # rollout workers start from the learner's weights (fresh or resumed)

    # -- one step, in order -------------------------------------------------------------------

    def draw_prompts(self) -> list:
        from alignment.jobs.sft import sample_order

        order = sample_order(len(self.prompts), self.cfg.seed, self.state.consumed_prompts, self.cfg.prompts_per_step)
        return [self.prompts[i] for i in order]

    def rollout(self, prompts: list):
        from alignment.grpo_parts import concat_rollouts, rollout_seed, split_prompts

        seed = rollout_seed(self.cfg.seed, self.state.step)
        chunks = split_prompts(prompts, self.cfg.rollout_pool.num_workers)
        batch = concat_rollouts(self.rollout_pool.map("rollout_step", [(c, self.cfg.samples_per_prompt, seed)
                                                                       for c in chunks]))  # fmt: skip
        if batch.policy_version != self.state.policy_version:
            raise RuntimeError(f"rollout used policy {batch.policy_version}, expected {self.state.policy_version}")
        return batch

    def score(self, batch):
        return self._score(batch.images, batch.prompts, self.cfg.samples_per_prompt)

    def _score(self, images: torch.Tensor, prompts: list[str], group: int):
        """Rewards of images [N, 3, H, W], split over the reward workers in whole groups of `group`."""
        from rewards.worker import concat

        chunks = _group_chunks(len(prompts), group, self.cfg.reward_pool.num_workers)
        return concat(self.reward_pool.map("score", [(images[s:e], prompts[s:e]) for s, e in chunks]))

    def needs_soft_values(self) -> bool:
        """Whether an update of this step trains the prefix on its soft value (continuations needed)."""
        from alignment.grpo_parts import soft_value_phase

        first = self.state.step * self.cfg.inner_epochs
        return any(soft_value_phase(self.cfg.train_part, first + e) for e in range(self.cfg.inner_epochs))

    def soft_values(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Soft values [B] of every sample's token prefix from C continuations drawn by the rollout pool
        (the current policy, fresh seeds) and scored by the reward pool; with their metrics."""
        from alignment.grpo_parts import continuation_seeds, prefix_values

        part, b = self.cfg.train_part, len(batch)
        c = part.soft_value_samples
        seeds = continuation_seeds(batch.seeds, c, self.cfg.seed, self.state.step).flatten()  # [B*C], sample-major
        prompts = [p for p in batch.prompts for _ in range(c)]
        prefixes = batch.tokens[:, : part.prefix].repeat_interleave(c, dim=0)  # [B*C, m, 64]
        group = self.cfg.samples_per_prompt * c  # a prompt's continuations stay on one worker
        chunks = _group_chunks(b * c, group, self.cfg.rollout_pool.num_workers)
        images = torch.cat(self.rollout_pool.map("continue_prefixes", [(prompts[s:e], prefixes[s:e], seeds[s:e])
                                                                       for s, e in chunks]))  # fmt: skip
        rewards = self._score(images, prompts, group).scores.reshape(b, c)  # [B, C]
        return prefix_values(rewards, part.soft_value_eta)

    def update(self, batch, rewards: torch.Tensor, values: torch.Tensor | None = None) -> dict[str, float]:
        """Per update: returns (rewards [B], or the prefixes' soft values [B] in a soft-value prefix
        update), advantages per group, group filter, then the learner step; `inner_epochs` updates."""
        from alignment.grpo_parts import soft_value_phase, train_weights
        from alignment.losses import group_advantages, keep_groups

        cfg, g = self.cfg, self.cfg.samples_per_prompt
        t, k = batch.tokens.shape[1], batch.log_probs.shape[2]
        metrics, updated = {}, False
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
            out = self.learner.step(micro, self.loss_fn)
            if updated:  # keep the first update's on-policy health check; the rest from the last update
                out.pop("grpo/logprob_diff", None)
                out.pop("grpo/clip_frac_on_policy", None)
            elif "grpo/clip_frac" in out:  # before any update: nonzero means rollout and learner disagree
                out["grpo/clip_frac_on_policy"] = out["grpo/clip_frac"]
            updated = True
            metrics.update(out)
            metrics["grpo/trained_cells"] = float((weights > 0).float().mean())
        return metrics

    def loss_fn(self, model, mb: GrpoMicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        from alignment.objectives import grpo_objective

        cfg, bundle = self.cfg, self.bundle
        loss, metrics = grpo_objective(
            model, self.ref_model, bundle.tokenizer, bundle.ids, mb.batch, mb.advantages, mb.weights,
            cfg.resolved_clip_eps, cfg.beta, cfg.train_with_cfg, cfg.kl_scale,
        )  # fmt: skip
        return loss * mb.scale, metrics

    def sync_weights(self) -> None:
        """Broadcast the learner's weights as `state.policy_version` to every rollout worker."""
        weights = self.learner.policy_weights()
        self.rollout_pool.call_all("load_weights", weights, self.state.policy_version, sticky=True)

    def save(self) -> None:
        from alignment.runs import finish_checkpoint, save_published, staging_dir

        step_dir = staging_dir(self.run, self.state.step)  # renamed to step_N by finish_checkpoint
        dtype = torch.bfloat16 if self.cfg.learner.bf16 else None
        save_published(self.bundle, self.learner.policy_weights(), step_dir / "model", dtype)
        self.learner.save_state(step_dir)
        reward_states = self.reward_pool.call_all("state_dict")
        self.state.extra["reward_state"] = reward_states[0]  # one worker when a normalisation keeps state
        finish_checkpoint(self.run, step_dir, self.state, self.cfg.keep_last)

    def close(self) -> None:
        if self.logger is not None:  # None when the run directory was refused before open_run
            self.logger.close()
        self.rollout_pool.shutdown()
        self.reward_pool.shutdown()


def _group_chunks(num_samples: int, group: int, num_parts: int) -> list[tuple[int, int]]:
    """(start, end) sample ranges of whole groups, one per worker at most."""
    num_groups = num_samples // group
    n = min(num_parts, num_groups)
    bounds = [round(i * num_groups / n) * group for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_grpo(cfg: GrpoConfig) -> Path:
    """The GRPO job. Returns the run directory."""
    from tqdm.auto import tqdm

    from alignment.grpo_parts import reward_metrics
    from alignment.learner import NonFiniteLossError
    from alignment.runs import lock_dir, nonfinite_stop, prepare_run_dir
    from rollout.prompts import load_prompts

    prompts = load_prompts(cfg.prompts, cfg.prompt_field)  # bad input fails before the run dir exists
    print(describe(cfg, len(prompts)))
    if note := precision_note(cfg):
        print(note)
    trainer = GrpoTrainer(cfg, prompts)  # reward files, model: still nothing written on failure
    texts, limit = [p.text for p in prompts], cfg.sampling.max_prompt_tokens
    if note := truncation_note("grpo", "sampling.max_prompt_tokens", trainer.bundle.tokenizer, texts, limit):
        print(note)
    try:
        with lock_dir(Path(cfg.runs_root) / cfg.run_name, "grpo"):  # held for the job's life
            run = prepare_run_dir(cfg.runs_root, cfg.run_name, to_dict(cfg))
            trainer.open_run(run)
            state = trainer.state
            # a step whose every update was skipped for a non-finite loss is no step: its prompts are passed
            # over, with no metrics row and no checkpoint, until too many in a row stop the job
            progress = tqdm(initial=state.step, total=cfg.steps, desc="grpo")
            while state.step < cfg.steps:
                times = {}
                t0 = time.perf_counter()
                batch = trainer.rollout(trainer.draw_prompts())
                times["rollout"] = (t1 := time.perf_counter()) - t0
                rewards = trainer.score(batch)
                times["reward"] = (t2 := time.perf_counter()) - t1
                values, value_metrics = None, {}
                if trainer.needs_soft_values():  # train_part.soft_value_samples: continue every prefix, score
                    values, value_metrics = trainer.soft_values(batch)
                    now = time.perf_counter()
                    times["soft_value"], t2 = now - t2, now
                updates_before, skipped_before = trainer.learner.step_count, trainer.learner.num_skipped
                try:
                    metrics = trainer.update(batch, rewards.scores, values)
                except NonFiniteLossError as e:
                    progress.close()  # the error line then starts a line of its own
                    raise nonfinite_stop(run, e) from None
                times["learn"] = (t3 := time.perf_counter()) - t2
                if state.step == 0 and "grpo/clip_frac_on_policy" in metrics:  # once: the rollout/learner gap
                    diff = metrics.get("grpo/logprob_diff", float("nan"))
                    print(f"grpo: step 0, before any update: {metrics['grpo/clip_frac_on_policy']:.1%} of trained "
                          f"cells clipped, mean |log-prob diff| {diff:.2e}")  # fmt: skip
                state.consumed_prompts += cfg.prompts_per_step
                if trainer.learner.num_skipped > skipped_before and trainer.learner.step_count == updates_before:
                    continue
                state.step += 1
                state.num_skipped_steps = trainer.learner.num_skipped
                if "train/grad_norm" in metrics:  # an update happened: new weights, new version
                    state.policy_version += 1
                    trainer.sync_weights()
                times["sync"] = time.perf_counter() - t3
                total = sum(times.values())
                metrics.update(reward_metrics(rewards))
                metrics.update(value_metrics)
                metrics.update({f"time/{k}_s": v for k, v in times.items()})
                metrics.update({f"time/{k}_share": v / total for k, v in times.items()})
                metrics["samples/s"] = cfg.samples_per_step / total
                metrics["policy_version"] = float(state.policy_version)
                trainer.logger.log(state.step, metrics)
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward/mean']:.4f}")
                if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                    trainer.save()
            progress.close()
    finally:
        trainer.close()
    return run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/grpo/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 learner.lr=1e-5")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(GrpoConfig, args.config, args.overrides)
    out = run_grpo(cfg)
    print(f"grpo: done; checkpoints in {out}")
    return 0
