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

Processes: the driver (this file) runs the loop; the rollout and reward workers are pools (in-process or
Ray actors). The learner is in the driver (`learner_pool.kind: local`, world size 1) or N ranks as Ray
actors in one placement group (`learner_pool.kind: ray`, alignment/grpo_learner.py), each updating on its
share of the micro batches. New weights go to the rollout workers cast to the sync dtype: from learner
rank 0 by torch.distributed broadcast in flat buckets (alignment/weight_sync.py), never through the Ray
object store; in-process, by value. `sync/seconds`, `sync/bytes` and `sync/fraction_of_step` are logged.

A rollout worker that dies (Ray) is replaced by its pool and the run goes on with the batch it would have
drawn: the replacement first gets the current policy (in-process learner: the pool replays the last
`load_weights`; learner ranks: a new weight group or hand-over, alignment/grpo_learner.py), and what it sampled
before that is thrown away and sampled again (`rollout`, `continue_on_policy`): a sample is a function of
its prompt id, index, seed and the weights alone. At most `rollout.pool.max_restarts` per run.

Colocated (`weight_sync.colocated: true`, as verl and OpenRLHF offer): learner rank i and rollout worker i
time-share one GPU. One placement group holds N bundles of both actors' CPU/GPU summed (core/pools.py
`reserve_shared`); both are scheduled into bundle i, which setup checks from where Ray says each actor runs,
and the job releases the group after both pools. The weight group then uses gloo (NCCL refuses two ranks
on one GPU), or with `weight_sync.transport: ipc` there is none: learner rank i hands worker i a CUDA IPC
handle to each bucket it fills (verl / OpenRLHF's hand-over). Each step, in order:
  1. rollouts (and soft-value continuations): the learner holds its ZeRO shard of weights (plus, unless
     `learner.offload_optimizer`, its optimizer state) but no cached blocks;
  2. rewards (their own pool);
  3. the rollout workers free their KV caches and buffers (`release_memory`: gc + CUDA empty_cache);
  4. the learner's update (activations, gradients, ZeRO gathers);
  5. the weight sync, learner rank 0 -> every worker;
  6. the learner ranks free their cached blocks (`release_memory`), so step 1 of the next step finds them.
`time/release_s` is steps 3 + 6; `colocated/rollout_reserved_gib` and `colocated/learner_reserved_gib` the
most any worker / rank still reserves on its GPU after its release (0 on a CPU).

The config, with what clip_eps means per latent dim, is in alignment/grpo_config.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from alignment.grpo_config import GrpoConfig, describe, precision_note
from alignment.grpo_learner import RemoteLearner, grpo_loss, grpo_update
from alignment.learner import Learner, StepResult
from alignment.model_source import open_model
from alignment.objectives import GrpoMicroBatch
from alignment.synced_worker import SyncedRolloutWorker
from alignment.train_parts import prefix_values, soft_value_phase
from alignment.trainer import Trainer
from alignment.weight_sync import state_bytes
from base_model.checkpoint import resolve_model, verify_model_spec
from base_model.model import NextStepModel
from base_model.sequence import truncation_note
from core.placement import SharedBundles, unpaired
from core.pools import make_pool, reserve_shared
from core.rng import sample_order
from core.runs import finish_checkpoint, staging_dir
from core.schema import load_config
from rewards.base import RewardOutput, reward_metrics
from rewards.worker import RewardWorker, concat
from rollout.batch import RolloutBatch, continuation_seeds, rollout_seed
from rollout.prompts import Prompt, load_prompts
from rollout.worker import group_chunks, split_prompts


class GrpoTrainer(Trainer):
    """GRPO in the trainer shape: pools, policy, reference (`Learner(reference=True)`) and learner in setup;
    a step is one rollout batch -> rewards (-> soft values) -> `inner_epochs` updates -> new weights."""

    job = "grpo"
    remote: RemoteLearner | None = None  # the learner ranks on Ray (learner_pool.kind: ray)
    shared: SharedBundles | None = None  # colocated: the one placement group of learner ranks and rollout workers

    def __init__(self, config: GrpoConfig):
        super().__init__(config)
        self.config: GrpoConfig = config
        self.rollout_pool = self.reward_pool = None  # started by setup

    def setup(self) -> None:
        """Prompts, pools, policy, reference and learner; nothing is written yet."""
        config = self.config
        self.prompts = load_prompts(config.prompts, config.prompt_field)  # bad input fails before the run dir exists
        print(describe(config, len(self.prompts)))
        if note := precision_note(config):
            print(note)
        verify_model_spec(config.model)  # config and shard headers, before the rollout workers load them
        r = config.rollout
        if config.weight_sync.colocated:  # bundle i: learner rank i + rollout worker i
            self.shared = reserve_shared([config.learner_pool, r.pool], what="learner/rollout pairs")
        self.rollout_pool = make_pool(
            SyncedRolloutWorker,
            (config.model, config.sampling, r.device, r.dtype, r.micro_batch_samples, config.seed, r.num_threads),
            r.pool,
            bundles=self.shared,
        )
        self.reward_pool = make_pool(RewardWorker, (config.rewards,), config.rewards.pool)
        # the reference: a frozen copy of the starting policy (LoRA: the adapters disabled); a resume loads
        # the policy's state after this, so the reference stays the starting model
        if config.learner_pool.kind == "ray":  # the ranks hold the model; the driver its tokenizer only
            self.learner = self.remote = RemoteLearner(config, self.shared)
            if self.shared is not None:
                self.check_colocated()
            tokenizer = open_model(config.model, seed=config.seed).tokenizer
        else:
            torch.manual_seed(config.seed)
            self.bundle = resolve_model(config.model, seed=config.seed)
            self.learner = Learner(self.bundle.model.train(), config.learner, reference=config.beta > 0)
            tokenizer = self.bundle.tokenizer
        texts, limit = [p.text for p in self.prompts], config.sampling.max_prompt_tokens
        if note := truncation_note("grpo", "sampling.max_prompt_tokens", tokenizer, texts, limit):
            print(note)

    def check_colocated(self) -> None:
        """Learner rank i and rollout worker i in one bundle, one node, the same GPUs, as Ray reports them."""
        ranks, workers = self.remote.ranks.placements(), self.rollout_pool.placements()
        if apart := unpaired(ranks, workers):
            raise RuntimeError(f"weight_sync.colocated: learner rank {apart[0]} runs at {ranks[apart[0]]}, its "
                               f"rollout worker at {workers[apart[0]]}")  # fmt: skip
        gpus = ", ".join("/".join(p.gpu_ids) or "-" for p in ranks)
        print(f"grpo: colocated: learner rank i and rollout worker i share bundle i of one placement group "
              f"({len(ranks)} pairs; GPUs {gpus})")  # fmt: skip

    def opened(self, resumed_from: Path | None) -> None:
        if resumed_from is not None:
            self.reward_pool.call_all("load_state_dict", self.state.reward_state)
        self.sync_weights()  # rollout workers start from the learner's weights (fresh or resumed; forms the group)
        if self.shared is not None:  # the first rollouts find the learner's cache empty
            self.release_learner()

    def release_learner(self) -> int:
        """Colocated: the learner ranks' cached device blocks go back to the shared GPUs (step 6 of the
        module docstring); returns the most bytes a rank still reserves."""
        return max(self.remote.ranks.call_all("release_memory"))

    def step(self) -> dict[str, float] | None:
        config, state = self.config, self.state
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
        reserved = {}
        if self.shared is not None:  # the shared GPUs go to the learner once the workers are done (step 3)
            reserved["rollout"] = max(self.rollout_pool.call_all("release_memory"))
            now = time.perf_counter()
            times["release"], t2 = now - t2, now
        skipped_before = self.learner.num_skipped
        result = self.update(batch, rewards.scores, values)
        times["learn"] = (t3 := time.perf_counter()) - t2
        metrics = result.metrics
        if state.step == 0 and "grpo/clip_frac_on_policy" in metrics:  # once: the rollout/learner gap
            diff = metrics.get("grpo/logprob_diff", float("nan"))
            print(f"grpo: step 0, before any update: {metrics['grpo/clip_frac_on_policy']:.1%} of trained "
                  f"cells clipped, mean |log-prob diff| {diff:.2e}")  # fmt: skip
        state.consumed_prompts += config.prompts_per_step  # a skipped attempt passes its prompts over
        if self.learner.num_skipped > skipped_before and not result.updated:
            if self.shared is not None:
                self.release_learner()
            return None  # every update skipped for a non-finite loss: no step
        sync_bytes = 0
        if result.updated:  # new weights, new version
            state.policy_version += 1
            sync_bytes = self.sync_weights()
        times["sync"] = (t4 := time.perf_counter()) - t3
        if self.shared is not None:  # and back to the rollouts (step 6)
            reserved["learner"] = self.release_learner()
            times["release"] += time.perf_counter() - t4
        total = sum(times.values())
        metrics.update(reward_metrics(rewards))
        metrics.update(value_metrics)
        metrics.update({f"time/{k}_s": v for k, v in times.items()})
        metrics.update({f"time/{k}_share": v / total for k, v in times.items()})
        metrics["samples/s"] = config.samples_per_step / total
        metrics.update({"sync/seconds": times["sync"], "sync/bytes": float(sync_bytes),
                        "sync/fraction_of_step": times["sync"] / total})  # fmt: skip
        metrics.update({f"colocated/{k}_reserved_gib": v / 2**30 for k, v in reserved.items()})
        metrics["grpo/policy_version"] = float(state.policy_version)
        return metrics

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['reward/mean']:.4f}"}

    # -- the parts of a step, in order --------------------------------------------------------------

    def draw_prompts(self) -> list[Prompt]:
        order = sample_order(
            len(self.prompts), self.config.seed, self.state.consumed_prompts, self.config.prompts_per_step
        )
        return [self.prompts[i] for i in order]

    def rollout(self, prompts: list[Prompt]) -> RolloutBatch:
        """G samples of each prompt, in chunks of whole prompts over the rollout workers; a chunk sampled by a
        worker without the current policy (a dead worker's replacement) is sampled again once it has it."""
        seed, version = rollout_seed(self.config.seed, self.state.step), self.state.policy_version
        chunks = split_prompts(prompts, self.config.rollout.pool.num_workers)
        calls = [(c, self.config.samples_per_prompt, seed) for c in chunks]
        parts = self.rollout_pool.map("rollout_step", calls)
        while stale := [i for i, part in enumerate(parts) if part.policy_version != version]:
            self.resync_replaced(f"rollout used policy {parts[stale[0]].policy_version}, expected {version}")
            print(f"grpo: step {self.state.step}: {len(stale)} rollout chunk(s) sampled without policy {version} "
                  "(a replaced worker); sampling them again")  # fmt: skip
            for i, part in zip(stale, self.rollout_pool.map("rollout_step", [calls[i] for i in stale])):
                parts[i] = part
        return RolloutBatch.concat(parts)

    def score(self, batch: RolloutBatch) -> RewardOutput:
        return self._score(batch.images, batch.prompts, self.config.samples_per_prompt)

    def _score(self, images: torch.Tensor, prompts: list[str], group: int) -> RewardOutput:
        """Rewards of images [N, 3, H, W], split over the reward workers in whole groups of `group`."""
        chunks = group_chunks(len(prompts), group, self.config.rewards.pool.num_workers)
        return concat(self.reward_pool.map("score", [(images[s:e], prompts[s:e]) for s, e in chunks]))

    def needs_soft_values(self) -> bool:
        """Whether an update of this step trains the prefix on its soft value (continuations needed)."""
        first = self.state.step * self.config.inner_epochs
        return any(soft_value_phase(self.config.train_part, first + e) for e in range(self.config.inner_epochs))

    def soft_values(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Soft values [B] of every sample's token prefix from C continuations drawn by the rollout pool
        (the current policy, fresh seeds) and scored by the reward pool; with their metrics."""
        part, b = self.config.train_part, len(batch)
        c = part.soft_value_samples
        seeds = continuation_seeds(batch.seeds, c, self.config.seed, self.state.step).flatten()  # [B*C], sample-major
        prompts = [p for p in batch.prompts for _ in range(c)]
        prefixes = batch.tokens[:, : part.prefix].repeat_interleave(c, dim=0)  # [B*C, m, 64]
        group = self.config.samples_per_prompt * c  # a prompt's continuations stay on one worker
        chunks = group_chunks(b * c, group, self.config.rollout.pool.num_workers)
        images = torch.cat(self.continue_on_policy([(prompts[s:e], prefixes[s:e], seeds[s:e]) for s, e in chunks]))
        rewards = self._score(images, prompts, group).scores.reshape(b, c)  # [B, C]
        return prefix_values(rewards, part.soft_value_eta)

    def continue_on_policy(self, calls: list[tuple]) -> list[torch.Tensor]:
        """`continue_prefixes` over the rollout pool, on workers that all hold the current policy: its images
        carry no version, so if a worker was replaced before or during the map, the policy is sent again
        (a new weight group) and every call is run again."""
        while True:
            if self.remote is not None and self.remote.workers_replaced(self.rollout_pool):
                self.sync_weights()
            restarts = self.rollout_pool.num_restarts
            images = self.rollout_pool.map("continue_prefixes", calls)
            if self.remote is None or self.rollout_pool.num_restarts == restarts:  # in-process: weights replayed
                return images
            print(f"grpo: step {self.state.step}: a rollout worker was replaced during the continuations; "
                  "continuing every prefix again")  # fmt: skip

    def resync_replaced(self, problem: str) -> None:
        """After a rollout worker was replaced: the current policy to every worker again (a new weight group).
        Anything else (in-process, the pool replays the weights to a replacement) is `problem`, raised."""
        if self.remote is None or not self.remote.workers_replaced(self.rollout_pool):
            raise RuntimeError(problem)
        self.sync_weights()

    def update(self, batch: RolloutBatch, rewards: torch.Tensor, values: torch.Tensor | None = None) -> StepResult:
        """`inner_epochs` updates on rewards [B] (or soft values [B]): alignment/grpo_learner.py, here or on
        every learner rank (each on its share of the micro batches)."""
        if self.remote is not None:
            return self.remote.update(self.state.step, batch, rewards, values)
        return grpo_update(self.learner, self.loss_fn, self.config, self.state.step, batch, rewards, values)

    def loss_fn(self, model: NextStepModel, mb: GrpoMicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return grpo_loss(self.config, self.bundle, self.learner, model, mb)

    def sync_weights(self) -> int:
        """The learner's weights as `state.policy_version` to every rollout worker, cast to the sync dtype;
        returns the bytes sent (once, whatever the number of workers)."""
        version, dtype = self.state.policy_version, self.config.sync_dtype
        if self.remote is not None:  # learner rank 0 -> the weight group, bucket by bucket
            return self.remote.sync_weights(self.rollout_pool, version)
        # in-process: the stream a broadcast sends (same rounding), copied out on the CPU in the sync dtype
        weights = {name: t.to("cpu", copy=True) for name, t in self.learner.iter_policy(getattr(torch, dtype))}
        self.rollout_pool.call_all("load_weights", weights, version, sticky=True)
        return state_bytes(weights, getattr(torch, dtype))

    def save(self) -> None:
        """With learner ranks on Ray the ranks write the learner's part (rank 0 the published model, every
        rank its DeepSpeed state), the driver the rest; in-process as every trainer does."""
        if self.remote is None:
            return super().save()
        step_dir = staging_dir(self.run_dir, self.state.step)
        self.remote.save(step_dir, self.checkpoint_dtype)
        self.save_extra(step_dir)
        finish_checkpoint(self.run_dir, step_dir, self.state, self.config.keep_last)

    def save_extra(self, step_dir: Path) -> None:
        reward_states = self.reward_pool.call_all("state_dict")
        self.state.reward_state = reward_states[0]  # one worker when a normalisation keeps state

    def cleanup(self) -> None:
        super().cleanup()
        for pool in (self.remote, self.rollout_pool, self.reward_pool):
            if pool is not None:
                pool.shutdown()
        if self.shared is not None:  # after both pools in it
            self.shared.release()
            self.shared = None


def run_grpo(config: GrpoConfig) -> Path:
    """The GRPO job. Returns the run directory."""
    return GrpoTrainer(config).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/grpo/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 learner.lr=1e-5")


def run(args: argparse.Namespace) -> int:
    config = load_config(GrpoConfig, args.config, args.overrides)
    out = run_grpo(config)
    print(f"grpo: done; checkpoints in {out}")
    return 0
