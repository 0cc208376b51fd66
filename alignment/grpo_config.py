"""The `nsalign grpo` config: sizes, the objective's knobs, the pools and the learner, checked at load.

clip_eps bounds the ratio exp(log pi - log pi_old) of one (token, head step) cell. With
`sampling.logprob_reduction: mean` (published RL code) the log-ratio is averaged over the 64 latent
dims and the published range is 1e-4; with `sum` (the exact likelihood) the log-ratio is 64x larger,
so the same per-dim range is 64e-4. Leave clip_eps empty to get exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from alignment.learner_config import LearnerConfig
from alignment.train_parts import GroupFilterConfig, TrainPartConfig
from base_model.sampler import SamplingConfig
from base_model.sequence import check_sequence_fits, model_max_positions
from core.errors import ConfigError
from core.pools import PoolConfig
from rewards.base import RewardsConfig
from rollout.worker import RolloutConfig

LATENT_DIM = 64
SYNC_DTYPES = ("rollout", "bfloat16", "float16", "float32")


@dataclass
class WeightSyncConfig:
    """How a new policy reaches the rollout workers (alignment/weight_sync.py). With `learner_pool.kind: ray`
    learner rank 0 broadcasts it over torch.distributed in flat buckets; in-process it is cast the same way."""

    dtype: str = "rollout"  # bytes on the wire: rollout (the workers' own rollout.dtype), bfloat16, float16, float32
    bucket_mb: float = 512.0  # one flat bucket broadcast at a time
    backend: str = "auto"  # auto: nccl when rollout.device is CUDA (and not colocated), else gloo
    timeout_s: float = 600.0  # the weight group's rendezvous and each broadcast
    # rollout worker i and learner rank i time-share one GPU: both in bundle i of one placement group (its
    # size: the two pools' per-actor CPU/GPU summed, fractions of one GPU); the sequence is in jobs/grpo.py.
    # NCCL refuses two ranks on one GPU, so the weights then go over gloo (auto)
    colocated: bool = False
    # broadcast: learner rank 0 to every worker through a process group (`backend`); ipc (colocated only, as
    # verl / OpenRLHF): learner rank i fills the same buckets and hands worker i, on its GPU, a CUDA IPC
    # handle to each (shared memory on a CPU): no copy over a wire, no process group
    transport: str = "broadcast"

    def validate(self, where: str) -> None:
        if self.dtype not in SYNC_DTYPES:
            raise ConfigError(f"{where}.dtype: one of {', '.join(SYNC_DTYPES)}, got {self.dtype!r}")
        if not self.bucket_mb > 0:
            raise ConfigError(f"{where}.bucket_mb: must be > 0, got {self.bucket_mb}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"{where}.backend: 'auto', 'gloo' or 'nccl', got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ConfigError(f"{where}.timeout_s: must be > 0, got {self.timeout_s}")
        if self.transport not in ("broadcast", "ipc"):
            raise ConfigError(f"{where}.transport: 'broadcast' or 'ipc', got {self.transport!r}")

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 2**20)


@dataclass
class GrpoConfig:
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "rollout_pool": "rollout.pool",
        "reward_pool": "rewards.pool",
        "train_with_cfg": "train_with_guidance",
    }

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
    clip_eps: float | None = None  # None: 1e-4 per latent dim (module docstring)
    beta: float = 0.04  # KL to the frozen reference; 0 skips the reference model
    # exact: KL summed over the 64 dims with the step's true variance; flow_grpo: flow_grpo's scale (mean
    # over dims, sde variance without dt: D / dt = 640x smaller at K = 10), where its published beta applies
    kl_scale: str = "exact"
    # group: each group's std; global_std: flow_grpo's std of all raw rewards of the step; batch: RMS of
    # the within-group-centred rewards; none: centred rewards only
    advantage_scale: str = "group"
    train_with_guidance: bool = False  # NextStep-1.1 trains without CFG
    timestep_fraction: float = 1.0  # share of head steps trained per step (DanceGRPO 0.6)
    group_filter: GroupFilterConfig = field(default_factory=GroupFilterConfig)
    train_part: TrainPartConfig = field(default_factory=TrainPartConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    # local: one learner in the driver; ray: num_workers learner ranks (Ray actors in one placement group,
    # data-parallel over the micro batches), weights to the rollout workers by torch.distributed broadcast;
    # max_restarts / max_task_retries do not apply to ranks: a lost rank ends the run (it resumes from latest)
    learner_pool: PoolConfig = field(default_factory=PoolConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    checkpoint_every: int = 50
    keep_last: int = 3
    seed: int = 0
    tensorboard: bool = False
    wandb: bool = False

    def validate(self, where: str = "config") -> None:
        if not self.prompts:
            raise ConfigError(f"{where}.prompts: required (a prompt file)")
        if self.sampling.self_cot:  # the learner re-scores image chains only; the reasoning would go untrained
            raise ConfigError(f"{where}.sampling.self_cot: GRPO does not train Self-CoT reasoning yet (DPO does)")
        if self.sampling.sde_kind == "ode":
            raise ConfigError(f"{where}.sampling.sde_kind: 'ode' has no log-probs; GRPO needs 'sde' or 'cps'")
        for name in ("steps", "prompts_per_step", "micro_batch_samples", "inner_epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"{where}.samples_per_prompt: a group needs >= 2 samples, got {self.samples_per_prompt}")
        self._validate_sizes(where)
        self.learner.validate(f"{where}.learner")
        self.rollout.check_attention(self.sampling, where)
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
        if self.sampling.uses_guidance and not self.train_with_guidance:
            raise ConfigError(
                f"{where}.train_with_guidance: sampling.cfg_scale={self.sampling.cfg_scale} samples the "
                "guided policy, so its log-probs must be re-scored with both branches; "
                "set train_with_guidance: true (or cfg_scale: 1.0)"
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
        self._validate_placement(where)

    def _validate_placement(self, where: str) -> None:
        learners, rollout = self.learner_pool, self.rollout.pool
        if learners.kind == "local" and learners.num_workers != 1:
            raise ConfigError(f"{where}.learner_pool.num_workers: {learners.num_workers} learner ranks need "
                              "learner_pool.kind: ray (local is the one learner in the driver)")  # fmt: skip
        if learners.kind == "ray" and rollout.kind != "ray":
            raise ConfigError(f"{where}.rollout.pool.kind: learner ranks on Ray broadcast weights to rollout workers "
                              "in processes of their own; set rollout.pool.kind: ray")  # fmt: skip
        if self.weight_sync.transport == "ipc" and not self.weight_sync.colocated:
            raise ConfigError(f"{where}.weight_sync.transport: ipc hands learner rank i's buckets to the rollout "
                              "worker on its GPU; needs weight_sync.colocated: true")  # fmt: skip
        if not self.weight_sync.colocated:
            return
        if learners.kind != "ray" or learners.num_workers != rollout.num_workers:
            raise ConfigError(f"{where}.weight_sync.colocated: pairs learner rank i with rollout worker i; needs "
                              "learner_pool.kind: ray and as many learner ranks as rollout workers")  # fmt: skip
        shared = learners.num_gpus_per_worker + rollout.num_gpus_per_worker
        if shared > 1.0 + 1e-9:
            raise ConfigError(f"{where}.weight_sync.colocated: a learner rank and a rollout worker share one GPU; "
                              f"their num_gpus_per_worker sum to {shared:g} (> 1), e.g. use 0.5 each")  # fmt: skip
        if self.weight_sync.backend == "nccl":  # learner rank 0 and rollout worker 0 are on one GPU
            raise ConfigError(f"{where}.weight_sync.backend: nccl cannot hold two ranks on one GPU, as colocated "
                              "learner rank 0 and rollout worker 0 are; use auto (gloo)")  # fmt: skip

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
    def sync_dtype(self) -> str:
        """The dtype weights travel in: `weight_sync.dtype`, or the rollout workers' own."""
        return self.rollout.dtype if self.weight_sync.dtype == "rollout" else self.weight_sync.dtype

    @property
    def sync_backend(self) -> str:
        if self.weight_sync.backend != "auto":
            return self.weight_sync.backend
        return "nccl" if self.rollout.device.startswith("cuda") and not self.weight_sync.colocated else "gloo"

    @property
    def resolved_clip_eps(self) -> float:
        if self.clip_eps is not None:
            return self.clip_eps
        return 1e-4 if self.sampling.logprob_reduction == "mean" else 1e-4 * LATENT_DIM


def describe(config: GrpoConfig, num_prompts: int) -> str:
    """The derived sizes, printed at start."""
    s = config.sampling
    steps_per_update = config.samples_per_step // config.micro_batch_samples
    part = config.train_part
    soft = (f" (prefix return: soft value of {part.soft_value_samples} continuations, eta {part.soft_value_eta:g})"
            if part.soft_value_samples else "")  # fmt: skip
    return (
        f"grpo: {num_prompts} prompts; {config.prompts_per_step} prompts x {config.samples_per_prompt} samples = "
        f"{config.samples_per_step} samples/step in up to {steps_per_update} micro batches "
        f"of {config.micro_batch_samples}; "
        f"{config.inner_epochs} update(s)/step; {config.num_image_tokens} tokens x {s.num_head_steps} head steps "
        f"({s.time_grid} grid, {s.num_scored_steps} trained; {s.sde_kind}, log-prob {s.logprob_reduction}, "
        f"clip_eps {config.resolved_clip_eps:g}); "
        f"beta {config.beta:g} ({config.kl_scale} KL); "
        f"train part {part.kind}{soft}; {config.rollout.pool.num_workers} {config.rollout.pool.kind} rollout / "
        f"{config.rewards.pool.num_workers} {config.rewards.pool.kind} reward workers / "
        f"{config.learner_pool.num_workers} {config.learner_pool.kind} learner rank(s)"
        f"{' (colocated)' if config.weight_sync.colocated else ''}, weights synced in {config.sync_dtype}; "
        f"{config.steps} steps"
    )


def precision_note(config: GrpoConfig) -> str | None:
    """A one-line warning when rollouts and the learner run in different dtypes, else None.

    The learner then re-scores each chain with other numerics than the sampler's, so the ratio is not
    1 on an untouched policy (bf16 rollouts, fp32 learner: ~3e-3 mean log-prob gap, ~11% of cells
    clipped before any update); `grpo/clip_frac_on_policy` and `grpo/logprob_diff` show how much.
    """
    learner = "bfloat16" if config.learner.bf16 else "float32"
    if config.rollout.dtype == learner:
        return None
    return (
        f"grpo: warning: rollout.dtype {config.rollout.dtype} but the learner runs in {learner} "
        f"(learner.bf16: {config.learner.bf16}); log-probs differ before any update, see grpo/clip_frac_on_policy"
    )
