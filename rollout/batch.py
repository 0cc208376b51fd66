"""RolloutBatch: what a rollout worker hands to reward workers and learners (a contract of docs/architecture.md),
and the seeds its samples draw from: each a pure function of ids, indices, the run seed and the step, so a
sample redone elsewhere or after a resume draws exactly the same noise."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from base_model.sampler import SamplingConfig
from base_model.text import TextSample


@dataclass
class RolloutBatch:
    # what was asked
    prompts: list[str]  # [B] caption of each sample (repeated G times per prompt)
    prompt_ids: list[str]  # [B] stable prompt ids
    group_ids: torch.Tensor  # [B] long, index of the prompt group inside this batch
    seeds: torch.Tensor  # [B] long, the sample's seed (all its noise derives from it)
    # trajectory
    tokens: torch.Tensor  # [B, T, 64] fp32 emitted image tokens (after use_norm)
    chains: torch.Tensor | None  # [B, T, K+1, 64] fp32 head states x^0..x^K (RL only)
    log_probs: torch.Tensor | None  # [B, T, S] fp32 log-probs of the S scored steps (RL only; SampleResult)
    # outputs
    images: torch.Tensor  # [B, 3, H, W] uint8
    # provenance
    policy_version: int
    sampling: SamplingConfig
    # Self-CoT (sampling.self_cot): each sample's reasoning, as ids with their log-probs and as strings [B]
    text: TextSample | None = None
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def concat(cls, parts: list[RolloutBatch]) -> RolloutBatch:
        """Rollouts of consecutive prompt chunks -> one batch; group ids renumbered across chunks."""
        offsets, groups = 0, []
        for p in parts:
            groups.append(p.group_ids + offsets)
            offsets += int(p.group_ids.max()) + 1
        return cls(
            prompts=[s for p in parts for s in p.prompts], prompt_ids=[s for p in parts for s in p.prompt_ids],
            group_ids=torch.cat(groups), seeds=torch.cat([p.seeds for p in parts]),
            tokens=torch.cat([p.tokens for p in parts]), chains=torch.cat([p.chains for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]), images=torch.cat([p.images for p in parts]),
            policy_version=parts[0].policy_version, sampling=parts[0].sampling,
            text=TextSample.concat([p.text for p in parts]) if parts[0].text is not None else None,
            texts=[s for p in parts for s in p.texts] if parts[0].texts is not None else None,
        )  # fmt: skip

    def select(self, index: torch.Tensor | list[int]) -> RolloutBatch:
        """Rows `index` (e.g. the kept groups) as a new batch."""
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        return RolloutBatch(
            prompts=[self.prompts[i] for i in rows], prompt_ids=[self.prompt_ids[i] for i in rows],
            group_ids=self.group_ids[idx], seeds=self.seeds[idx], tokens=self.tokens[idx],
            chains=None if self.chains is None else self.chains[idx],
            log_probs=None if self.log_probs is None else self.log_probs[idx],
            images=self.images[idx], policy_version=self.policy_version, sampling=self.sampling,
            text=None if self.text is None else self.text.select(idx),
            texts=None if self.texts is None else [self.texts[i] for i in rows],
        )  # fmt: skip


def sample_seed(prompt_id: str, sample_index: int, run_seed: int) -> int:
    """Seed of sample `sample_index` of a prompt: a pure function of (prompt id, index, run seed), so a
    prompt redone on another worker after a crash draws exactly the same images."""
    digest = hashlib.sha1(f"{run_seed}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rollout_seed(run_seed: int, step: int) -> int:
    """Run seed of the rollouts of GRPO step `step`: fresh noise every step, the same after a resume."""
    digest = hashlib.sha1(f"grpo:{run_seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def continuation_seeds(sample_seeds: torch.Tensor, num_continuations: int, run_seed: int, step: int) -> torch.Tensor:
    """Seeds [B, C] of the continuations of each sample's prefix at GRPO step `step`: a pure function
    of (sample seed, continuation index, run seed, step), so a resumed run draws the same ones."""
    step_seed = int.from_bytes(hashlib.sha1(f"grpo-continuation:{run_seed}:{step}".encode()).digest()[:4], "little")
    return torch.tensor(
        [[sample_seed(str(int(s)), c, step_seed) for c in range(num_continuations)] for s in sample_seeds.tolist()],
        dtype=torch.long,
    )  # fmt: skip
