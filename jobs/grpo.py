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

The config, with what clip_eps means per latent dim, is in alignment/grpo_config.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from alignment.grpo_config import GrpoConfig, describe, precision_note
from alignment.learner import Learner, StepResult
from alignment.losses import group_advantages, keep_groups
from alignment.objectives import GrpoMicroBatch, grpo_objective, reference_means
from alignment.train_parts import prefix_values, soft_value_phase, train_weights
from alignment.trainer import Trainer
from base_model.checkpoint import resolve_model, verify_model_spec
from base_model.model import NextStepModel
from base_model.sequence import truncation_note
from core.pools import make_pool
from core.rng import sample_order
from core.schema import load_config
from rewards.base import RewardOutput, reward_metrics
from rewards.worker import RewardWorker, concat
from rollout.batch import RolloutBatch, continuation_seeds, rollout_seed
from rollout.prompts import Prompt, load_prompts
from rollout.worker import GrpoRolloutWorker, group_chunks, split_prompts


class GrpoTrainer(Trainer):
    """GRPO in the trainer shape: pools, policy, reference (`Learner(reference=True)`) and learner in setup;
    a step is one rollout batch -> rewards (-> soft values) -> `inner_epochs` updates -> new weights."""

    job = "grpo"

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
        self.rollout_pool = make_pool(
            GrpoRolloutWorker,
            (config.model, config.sampling, r.device, r.dtype, r.micro_batch_samples, config.seed, r.num_threads),
            r.pool,
        )
        self.reward_pool = make_pool(RewardWorker, (config.rewards,), config.rewards.pool)
        torch.manual_seed(config.seed)
        self.bundle = resolve_model(config.model, seed=config.seed)
        # the reference: a frozen copy of the starting policy (LoRA: the adapters disabled); a resume loads
        # the policy's state after this, so the reference stays the starting model
        self.learner = Learner(self.bundle.model.train(), config.learner, reference=config.beta > 0)
        texts, limit = [p.text for p in self.prompts], config.sampling.max_prompt_tokens
        if note := truncation_note("grpo", "sampling.max_prompt_tokens", self.bundle.tokenizer, texts, limit):
            print(note)

    def opened(self, resumed_from: Path | None) -> None:
        if resumed_from is not None:
            self.reward_pool.call_all("load_state_dict", self.state.reward_state)
        self.sync_weights()  # rollout workers start from the learner's weights (fresh or resumed)

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
        metrics["samples/s"] = config.samples_per_step / total
        metrics["policy_version"] = float(state.policy_version)
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
        seed = rollout_seed(self.config.seed, self.state.step)
        chunks = split_prompts(prompts, self.config.rollout.pool.num_workers)
        batch = RolloutBatch.concat(self.rollout_pool.map("rollout_step", [(c, self.config.samples_per_prompt, seed)
                                                                           for c in chunks]))  # fmt: skip
        if batch.policy_version != self.state.policy_version:
            raise RuntimeError(f"rollout used policy {batch.policy_version}, expected {self.state.policy_version}")
        return batch

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
        images = torch.cat(self.rollout_pool.map("continue_prefixes", [(prompts[s:e], prefixes[s:e], seeds[s:e])
                                                                       for s, e in chunks]))  # fmt: skip
        rewards = self._score(images, prompts, group).scores.reshape(b, c)  # [B, C]
        return prefix_values(rewards, part.soft_value_eta)

    def update(self, batch: RolloutBatch, rewards: torch.Tensor, values: torch.Tensor | None = None) -> StepResult:
        """Per update: returns (rewards [B], or the prefixes' soft values [B] in a soft-value prefix
        update), advantages per group, group filter, then the learner step; `inner_epochs` updates.
        `updated`: whether any of them changed the weights."""
        config, g = self.config, self.config.samples_per_prompt
        t, k = batch.tokens.shape[1], batch.log_probs.shape[2]
        metrics, tried, updated = {}, False, False
        for epoch in range(config.inner_epochs):
            index = self.state.step * config.inner_epochs + epoch
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
        config, bundle = self.config, self.bundle
        ref_means = None
        if config.beta > 0:  # the reference pass first: under LoRA it runs with the adapters off
            with self.learner.reference() as ref:
                ref_means = reference_means(ref, bundle.tokenizer, bundle.ids, mb.batch, config.train_with_guidance)
        loss, metrics = grpo_objective(
            model, None, bundle.tokenizer, bundle.ids, mb.batch, mb.advantages, mb.weights,
            config.resolved_clip_eps, config.beta, config.train_with_guidance, config.kl_scale, ref_means=ref_means,
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
