"""GRPO's update and its distributed parts: the learner ranks and the driver's handle on them (the rollout
worker that receives the weights is alignment/synced_worker.py).

One update (`grpo_update`): returns -> group advantages -> kept groups -> micro batches -> `Learner.step`.
With `learner_pool.kind: ray` every learner rank (`GrpoLearnerRank`, a Ray actor of core/rank_group.py)
runs the same function on the same rollout batch and keeps its data-parallel share of the micro
batches (`micro_share`); DeepSpeed averages the gradients, the Learner the metrics, and both equal the
one-rank update (the weights of `micro_share` make them so for any number of micro batches).
Weights then go from learner rank 0 to every `SyncedRolloutWorker` through alignment/weight_sync.py.

A rollout worker that dies is replaced by its pool (core/pools.py), but the replacement is in no weight
group and holds no policy (`SyncedRolloutWorker.policy_version` -1). `RemoteLearner.sync_weights` sees
the pool's restart count move, forms a new group of rank 0 and every worker (survivors drop the old one)
and sends the current version; a worker that dies during a sync fails the broadcast for everyone
(`GroupBroken`), and the sync is re-formed and sent again, as long as the pool has restarts left. The
job (jobs/grpo.py) re-samples whatever a replacement produced before it had the policy.

Colocated with `weight_sync.transport: ipc` there is no weight group: every learner rank walks the policy
into the same buckets and hands each, by a CUDA IPC (CPU: shared-memory) handle, to the worker on its own
GPU (`RemoteLearner.hand_over`), one bucket at a time, each rank's buffer refilled only once its worker has
copied the last one. A worker replaced meanwhile is simply handed the whole policy again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.grpo_config import GrpoConfig
from alignment.learner import Learner, NonFiniteLossError, StepResult
from alignment.losses import group_advantages, keep_groups
from alignment.model_source import open_model
from alignment.objectives import GrpoMicroBatch, grpo_objective, reference_means
from alignment.synced_worker import release_device_memory
from alignment.train_parts import soft_value_phase, train_weights
from alignment.weight_sync import (
    GroupBroken,
    Slot,
    WeightGroup,
    fill_buckets,
    plan_buckets,
    share_bucket,
)
from base_model.checkpoint import NextStepBundle, save_published
from base_model.model import NextStepModel
from core.placement import SharedBundles
from core.pools import WorkerLostError
from core.rank_group import RankGroup
from rollout.batch import RolloutBatch


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
        self.buckets = None  # an ipc hand-over's buckets, between `start_hand_over` and `end_hand_over`

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
        """Rank 0: a fresh weight group's store on `host` (the group it was in, if any, closed); returns its
        port (other ranks: None)."""
        if self.learner.rank != 0:
            return None
        if self.weights is not None:
            self.weights.close()
        self.weights = WeightGroup.host_store(host, world_size, timeout_s)
        return self.weights.port

    def join_weight_group(self, backend: str) -> int | None:
        """Rank 0: its rank in the group (0), or None if the rendezvous failed (a worker never came)."""
        if self.weights is None:
            return None
        try:
            return self.weights.join(backend)
        except torch.distributed.DistError:  # the store's timeout: a member died before joining
            self.weights.close()
            return None

    def send_weights(self, dtype: str, bucket_bytes: int) -> int | None:
        """Every rank walks the policy tensor by tensor on its device (gathers are collective under ZeRO-3);
        rank 0 copies each tensor into the weight group's bucket as it comes and broadcasts each full bucket,
        so no rank holds the whole policy. Returns the bytes sent (other ranks: 0); None if the broadcast
        failed (a worker died: rank 0 has closed the group)."""
        stream = self.learner.iter_policy(getattr(torch, dtype))
        if self.weights is None or self.weights.group is None:  # rank 0 in no group: after a failed rendezvous
            for _ in stream:  # ranks other than 0: their part of every gather; nothing is yielded
                pass
            return 0 if self.learner.rank != 0 else None
        shapes = self.learner.policy_shapes()
        try:
            return self.weights.send_stream(shapes, stream, getattr(torch, dtype), bucket_bytes, self.learner.device)
        except GroupBroken:
            return None

    def start_hand_over(self, dtype: str, bucket_bytes: int) -> list[list[Slot]]:
        """Colocated ipc: this rank's own walk of the policy (keep on every rank: each has every full tensor
        in turn, the ZeRO-3 gathers being collective) into the buckets of the plan it returns."""
        sync_dtype = getattr(torch, dtype)
        itemsize = torch.empty((), dtype=sync_dtype).element_size()
        plan = plan_buckets(self.learner.policy_shapes(), itemsize, bucket_bytes)
        stream = self.learner.iter_policy(sync_dtype, every_rank=True)
        self.buckets = fill_buckets(plan, stream, sync_dtype, bucket_bytes, self.learner.device)
        return plan

    def next_bucket_handle(self) -> tuple:
        """The walk's next bucket, as a handle for the worker on this GPU; valid until the next call."""
        return share_bucket(next(self.buckets))

    def end_hand_over(self) -> None:
        """Once the worker has copied the last bucket: the walk run to its end, its buffer let go."""
        next(self.buckets, None)
        self.buckets = None

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
        # the rollout pool's restart count when its workers last formed a weight group (ipc: were last handed
        # a policy); None before the first sync
        self.synced_restarts: int | None = None

    def workers_replaced(self, rollout_pool) -> bool:
        """A rollout worker replaced since the last group formed or hand-over began (or no sync yet): the
        replacement lacks the current policy, and with a broadcast it is in no weight group."""
        return self.synced_restarts != rollout_pool.num_restarts

    def sync_weights(self, rollout_pool, version: int) -> int:
        """Policy `version` to every rollout worker; returns the bytes sent (the policy in the sync dtype,
        once). A worker that dies in the sync (the pool replaces it) or before it (its replacement is in no
        weight group) has the sync done again from scratch, until the pool runs out of restarts: then one
        WorkerLostError."""
        while True:
            try:
                sent = self.try_sync(rollout_pool, version)
            except WorkerLostError as e:
                raise WorkerLostError(f"weight sync of policy {version}: a rollout worker died and rollout.pool has "
                                      f"no restarts left (max_restarts: {self.config.rollout.pool.max_restarts}); "
                                      "the run stops, and resumes from latest when started again") from e  # fmt: skip
            if sent is not None:
                return sent
            if not self.workers_replaced(rollout_pool):  # no worker was lost: trying again would fail again
                raise RuntimeError(f"weight sync of policy {version} failed with every rollout worker alive "
                                   f"(weight_sync.timeout_s: {self.config.weight_sync.timeout_s})")  # fmt: skip

    def try_sync(self, rollout_pool, version: int) -> int | None:
        """One attempt of `sync_weights`: the bytes sent, or None if a worker died."""
        if self.config.weight_sync.transport == "ipc":  # no group: a hand-over reaches whichever workers there are
            self.synced_restarts = rollout_pool.num_restarts
            return self.hand_over(rollout_pool, version)
        if self.workers_replaced(rollout_pool) and not self.open_weight_group(rollout_pool):
            return None
        return self.send_weights(rollout_pool, version)

    def open_weight_group(self, rollout_pool) -> bool:
        """Learner rank 0 + every rollout worker: rank 0 hosts a fresh store on its node, every worker drops
        the group it was in, all join at once. False when a worker died meanwhile (the pool replaced it)."""
        sync, backend = self.config.weight_sync, self.config.sync_backend
        world = 1 + rollout_pool.num_workers
        rollout_pool.call_all_or_replace("pid")  # a worker that died idle is replaced before, not in, the rendezvous
        if self.synced_restarts is not None:
            print(f"grpo: weight group formed again ({rollout_pool.num_restarts} rollout worker(s) replaced so far)")
        self.synced_restarts = rollout_pool.num_restarts
        port = self.ranks.call_all("host_weight_store", self.ranks.master_addr, world, sync.timeout_s)[0]
        pending = self.ranks.submit("join_weight_group", backend)
        joined = rollout_pool.call_all_or_replace("join_weight_group", self.ranks.master_addr, port, world, backend,
                                                  sync.timeout_s)  # fmt: skip
        return self.ranks.collect(pending)[0] is not None and None not in joined

    def send_weights(self, rollout_pool, version: int) -> int | None:
        """Every rank gathers, rank 0 broadcasts, the workers receive (all at once); returns the bytes sent,
        or None if the broadcast failed (a worker died in it, or was not in the group)."""
        pending = self.ranks.submit("send_weights", self.config.sync_dtype, self.config.weight_sync.bucket_bytes)
        received = rollout_pool.call_all_or_replace("receive_weights", version)
        sent = self.ranks.collect(pending)[0]
        return sent if None not in received else None

    def hand_over(self, rollout_pool, version: int) -> int | None:
        """Colocated ipc: learner rank i walks the policy into buckets and hands each, by handle, to rollout
        worker i on its GPU, bucket by bucket in lockstep; returns the bytes a worker copied (the policy in the
        sync dtype), or None if a worker died or (a replacement) missed a bucket. The walk runs to its end: the
        ranks' ZeRO-3 gathers are collective."""
        plan = self.ranks.call_all("start_hand_over", self.config.sync_dtype, self.config.weight_sync.bucket_bytes)
        whole = None not in rollout_pool.call_all_or_replace("start_hand_over", plan[0])
        copied = 0
        for index in range(len(plan[0])):
            handles = self.ranks.call_all("next_bucket_handle")  # rank i's, for worker i
            took = rollout_pool.call_each_or_replace("take_bucket", [(version, index, h) for h in handles])
            whole = whole and None not in took
            copied += took[0] or 0
        self.ranks.call_all("end_hand_over")
        return copied if whole else None

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
