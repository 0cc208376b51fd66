"""GRPO's update and its distributed parts: the learner ranks, the driver's handle on them, and the
rollout worker that receives weights over torch.distributed.

One update (`grpo_update`): returns -> group advantages -> kept groups -> micro batches -> `Learner.step`.
With `learner_pool.kind: ray` every learner rank (`GrpoLearnerRank`, a Ray actor of core/rank_group.py)
runs the same function on the same rollout batch and keeps its data-parallel share of the micro
batches (`micro_share`); DeepSpeed averages the gradients, the Learner the metrics, and both equal the
one-rank update (the weights of `micro_share` make them so for any number of micro batches).
Weights then go from learner rank 0 to every `SyncedRolloutWorker` through alignment/weight_sync.py.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.grpo_config import GrpoConfig
from alignment.learner import Learner, NonFiniteLossError, StepResult
from alignment.losses import group_advantages, keep_groups
from alignment.model_source import open_model
from alignment.objectives import GrpoMicroBatch, grpo_objective, reference_means
from alignment.train_parts import soft_value_phase, train_weights
from alignment.weight_sync import WeightGroup
from base_model.checkpoint import NextStepBundle, save_published
from base_model.model import NextStepModel
from core.placement import SharedBundles
from core.rank_group import RankGroup
from rollout.batch import RolloutBatch
from rollout.worker import GrpoRolloutWorker


def micro_share(num_micro: int, rank: int, world_size: int) -> list[tuple[int, float]]:
    """(micro batch index, weight) for each of this rank's ceil(M / W) micro steps: rank r takes the
    contiguous run r*c .. r*c + c - 1 (c = ceil(M / W)); slots past M repeat micro batch 0 with weight 0,
    so every rank runs c micro steps and the ranks' collectives pair up. A real slot weighs c * W / M:
    the Learner averages over c micro batches then over W ranks, so sum_i (c W / M) x_i / (c W) is the
    mean over all M. One rank: every micro batch, weight 1."""
    c = -(-num_micro // world_size)
    weight = c * world_size / num_micro
    return [(i, weight) if i < num_micro else (0, 0.0) for i in range(rank * c, rank * c + c)]


@dataclass
class RankMicroBatch(GrpoMicroBatch):
    metric_weight: float = 1.0  # micro_share's weight: scales the loss (through `scale`) and the metrics


def grpo_update(learner: Learner, loss_fn, config: GrpoConfig, step: int, batch: RolloutBatch,
                rewards: torch.Tensor, values: torch.Tensor | None = None, rank: int = 0,
                world_size: int = 1) -> StepResult:  # fmt: skip
    """Per update: returns (rewards [B], or the prefixes' soft values [B] in a soft-value prefix update),
    advantages per group, group filter, then the learner step on this rank's share; `inner_epochs`
    updates. `updated`: whether any of them changed the weights."""
    g = config.samples_per_prompt
    t, k = batch.tokens.shape[1], batch.log_probs.shape[2]
    metrics, tried, updated = {}, False, False
    for epoch in range(config.inner_epochs):
        index = step * config.inner_epochs + epoch
        returns = values if values is not None and soft_value_phase(config.train_part, index) else rewards
        grouped = returns.reshape(-1, g)  # [P, G]
        keep = keep_groups(grouped, config.group_filter.min_std, config.group_filter.max_mean)  # [P]
        metrics["grpo/zero_std_group_ratio"] = float((grouped.std(dim=1, unbiased=False) < 1e-8).float().mean())
        metrics["grpo/kept_groups"] = float(keep.sum())
        if not keep.any():
            continue
        # over every group of the step, then the kept ones: global_std's std is of all the step's rewards
        advantages = group_advantages(grouped, scale=config.advantage_scale)[keep].flatten()  # [B_kept]
        kept = batch.select(keep.repeat_interleave(g).nonzero().flatten())
        n, mb = len(kept), config.micro_batch_samples
        num_micro = -(-n // mb)
        weights = train_weights(config.train_part, t, k, index, config.timestep_fraction, config.seed)
        micro = []
        for i, w in micro_share(num_micro, rank, world_size):
            s = i * mb
            micro.append(RankMicroBatch(kept.select(list(range(s, min(s + mb, n)))), advantages[s : s + mb], weights,
                                        scale=min(mb, n - s) * num_micro / n * w, metric_weight=w))  # fmt: skip
        result = learner.step(micro, loss_fn)
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


def grpo_loss(config: GrpoConfig, bundle: NextStepBundle, learner: Learner, model: NextStepModel,
              mb: GrpoMicroBatch) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The GRPO objective of one micro batch, scaled (and its metrics weighted) for gradient accumulation."""
    ref_means = None
    if config.beta > 0:  # the reference pass first: under LoRA it runs with the adapters off
        with learner.reference() as ref:
            ref_means = reference_means(ref, bundle.tokenizer, bundle.ids, mb.batch, config.train_with_guidance)
    loss, metrics = grpo_objective(
        model, None, bundle.tokenizer, bundle.ids, mb.batch, mb.advantages, mb.weights,
        config.resolved_clip_eps, config.beta, config.train_with_guidance, config.kl_scale, ref_means=ref_means,
    )  # fmt: skip
    w = getattr(mb, "metric_weight", 1.0)
    return loss * mb.scale, {k: v * w for k, v in metrics.items()} if w != 1.0 else metrics


@dataclass
class RankStep:
    """What a learner rank returns from an update: rank 0's is logged."""

    result: StepResult | None  # None: the job stops (`nonfinite` says why)
    num_skipped: int
    nonfinite: str | None = None


class GrpoLearnerRank:
    """One learner rank: the policy and its frozen reference in a Learner. A Ray actor of a RankGroup
    (its rank and world from the launcher variables RankGroup sets); rank 0 also sends the weights."""

    def __init__(self, config: GrpoConfig):
        self.config = config
        source = open_model(config.model, seed=config.seed)  # weights read parameter by parameter
        torch.manual_seed(config.seed)
        # a rendezvous of all ranks; under ZeRO-3 policy and reference are built partitioned (zero.Init)
        self.learner = Learner.from_source(source.build, source.read, config.learner, reference=config.beta > 0,
                                           where=source.where)  # fmt: skip
        self.bundle = source.bundle(self.learner.model)
        self.weights: WeightGroup | None = None

    def loss_fn(self, model: NextStepModel, mb: GrpoMicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return grpo_loss(self.config, self.bundle, self.learner, model, mb)

    def update(self, step: int, batch: RolloutBatch, rewards: torch.Tensor, values: torch.Tensor | None) -> RankStep:
        learner = self.learner
        try:
            result = grpo_update(learner, self.loss_fn, self.config, step, batch, rewards, values,
                                 learner.rank, learner.world_size)  # fmt: skip
        except NonFiniteLossError as e:
            return RankStep(None, learner.num_skipped, str(e))
        return RankStep(result, learner.num_skipped)

    def host_weight_store(self, host: str, world_size: int, timeout_s: float) -> int | None:
        """Rank 0: the weight group's store on `host`; returns its port (other ranks: None)."""
        if self.learner.rank != 0:
            return None
        self.weights = WeightGroup.host_store(host, world_size, timeout_s)
        return self.weights.port

    def join_weight_group(self, backend: str) -> int | None:
        return self.weights.join(backend) if self.weights is not None else None

    def send_weights(self, dtype: str, bucket_bytes: int) -> int:
        """Every rank walks the policy tensor by tensor on its device (gathers are collective under ZeRO-3);
        rank 0 copies each tensor into the weight group's bucket as it comes and broadcasts each full bucket,
        so no rank holds the whole policy. Returns the bytes sent (other ranks: 0)."""
        stream = self.learner.iter_policy(getattr(torch, dtype))
        if self.weights is None:
            for _ in stream:  # ranks other than 0: their part of every gather; nothing is yielded
                pass
            return 0
        shapes = self.learner.policy_shapes()
        return self.weights.send_stream(shapes, stream, getattr(torch, dtype), bucket_bytes, self.learner.device)

    def save(self, step_dir: Path, dtype: torch.dtype | None) -> None:
        """A checkpoint's learner part: rank 0 the published model, every rank its DeepSpeed state."""
        weights = self.learner.policy_weights(rank0_only=True)  # collective under ZeRO-3
        if self.learner.rank == 0:
            save_published(self.bundle, weights, step_dir / "model", dtype)
        self.learner.save_state(step_dir)
        self.learner.barrier()

    def load_state(self, directory: Path) -> int:
        self.learner.load_state(directory)
        return self.learner.num_skipped

    def release_memory(self) -> int:
        """Colocated, after the update and the sync: the cached blocks go back to the device while rollouts run."""
        return release_device_memory(self.learner.device)


class RemoteLearner:
    """The driver's handle on the learner ranks: what the trainer asks of a Learner (resume, the skip
    count, a barrier), plus the GRPO update and the checkpoint write, each run on every rank at once."""

    def __init__(self, config: GrpoConfig, bundles: SharedBundles | None = None):
        self.config = config
        self.ranks = RankGroup(GrpoLearnerRank, (config,), config.learner_pool, where="learner_pool", bundles=bundles)
        self.num_skipped = 0

    def open_weight_group(self, rollout_pool) -> None:
        """Learner rank 0 + every rollout worker: rank 0 hosts the store on its node, all join at once."""
        sync = self.config.weight_sync
        world = 1 + rollout_pool.num_workers
        port = self.ranks.call_all("host_weight_store", self.ranks.master_addr, world, sync.timeout_s)[0]
        pending = self.ranks.submit("join_weight_group", self.config.sync_backend)
        rollout_pool.call_all("join_weight_group", self.ranks.master_addr, port, world, self.config.sync_backend,
                              sync.timeout_s)  # fmt: skip
        self.ranks.collect(pending)

    def sync_weights(self, rollout_pool, version: int) -> int:
        """Every rank gathers, rank 0 broadcasts, the workers receive (all at once); returns the bytes sent."""
        pending = self.ranks.submit("send_weights", self.config.sync_dtype, self.config.weight_sync.bucket_bytes)
        rollout_pool.call_all("receive_weights", version)
        return self.ranks.collect(pending)[0]

    def update(self, step: int, batch: RolloutBatch, rewards: torch.Tensor, values: torch.Tensor | None) -> StepResult:
        first: RankStep = self.ranks.call_all("update", step, batch, rewards, values)[0]
        self.num_skipped = first.num_skipped
        if first.nonfinite is not None:
            raise NonFiniteLossError(first.nonfinite)
        return first.result

    def load_state(self, directory: Path) -> None:
        self.num_skipped = self.ranks.call_all("load_state", directory)[0]

    def save(self, step_dir: Path, dtype: torch.dtype | None) -> None:
        self.ranks.call_all("save", step_dir, dtype)

    def barrier(self) -> None:
        """Nothing to wait for: every call returns once all ranks are done."""

    def shutdown(self) -> None:
        self.ranks.shutdown()


class SyncedRolloutWorker(GrpoRolloutWorker):
    """A GRPO rollout worker that joins the weight group and takes each new policy from its broadcast."""

    weight_group: WeightGroup | None = None

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> int:
        self.weight_group = WeightGroup.connect(host, port, world_size, timeout_s)
        return self.weight_group.join(backend)

    def receive_weights(self, version: int) -> int:
        """The policy broadcast by learner rank 0, into this worker's model in place; returns the bytes."""
        if self.weight_group is None:  # e.g. a replacement for a dead worker: a group cannot be rejoined
            raise RuntimeError("this rollout worker is in no weight group (a replacement worker cannot join a "
                               "running one); restart the run: it resumes from latest")  # fmt: skip
        received = self.weight_group.receive(self.bundle.model.state_dict(), self.device)
        self.policy_version = version
        return received

    def release_memory(self) -> int:
        """Between rollout and learning when colocated: the sampler's caches go back to the device."""
        return release_device_memory(self.device)


def release_device_memory(device: torch.device | str) -> int:
    """Collect garbage and return the CUDA caching allocator's free blocks to the device; returns the
    bytes this process still reserves there (0 off CUDA)."""
    gc.collect()
    if not str(device).startswith("cuda"):
        return 0
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)
