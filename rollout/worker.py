"""RolloutWorker: holds a policy copy on its device and turns prompts into RolloutBatches.

A plain class: it runs in-process (LocalPool) or as a Ray actor (RayPool) unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from base_model.checkpoint import load_checkpoint, resolve_model
from base_model.flash_attention import check_flash, placement_problem
from base_model.generate import decode_text, decode_tokens, sample_prompts
from base_model.sampler import SamplingConfig
from base_model.text import TextSample
from core.errors import ConfigError
from core.pools import PoolConfig
from rollout.batch import RolloutBatch, sample_seed
from rollout.prompts import Prompt


@dataclass
class RolloutConfig:
    """Where and how the policy samples (one RolloutWorker per pool worker)."""

    device: str = "cpu"
    dtype: str = "float32"  # bfloat16 on GPUs
    micro_batch_samples: int = 16  # images sampled together by one worker
    num_threads: int | None = None  # torch CPU threads per worker (None: as Ray / torch set them)
    pool: PoolConfig = field(default_factory=PoolConfig)

    def validate(self, where: str) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{where}.dtype: {self.dtype!r} is not one of float32, bfloat16, float16")
        if self.micro_batch_samples < 1:
            raise ConfigError(f"{where}.micro_batch_samples: must be >= 1")
        if self.device.startswith("cuda") and self.pool.kind == "ray" and self.pool.num_gpus_per_worker <= 0:
            raise ConfigError(f"{where}.pool.num_gpus_per_worker: device {self.device} needs a GPU per Ray worker")

    def check_attention(self, sampling: SamplingConfig, where: str) -> None:
        """`sampling.attention: flash` where these workers' device and dtype cannot run it: one ConfigError at
        load (the workers check again, with flash_attn's import, before loading weights)."""
        if sampling.attention != "flash":
            return
        if problem := placement_problem(torch.device(self.device), getattr(torch, self.dtype)):
            raise ConfigError(f"{where}.sampling.attention: flash {problem} (rollout.device {self.device}, "
                              f"rollout.dtype {self.dtype})")  # fmt: skip


class RolloutWorker:
    def __init__(
        self,
        model: str,
        sampling: SamplingConfig,
        device: str = "cpu",
        dtype: str = "float32",
        micro_batch_samples: int = 16,
        run_seed: int = 0,
        num_threads: int | None = None,
    ):
        """model: checkpoint directory or a random preset (`tiny`, `mid`); dtype float32 / bfloat16;
        num_threads: torch CPU threads (CPU results are bit-identical only at equal thread counts)."""
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device, self.dtype = device, getattr(torch, dtype)
        if sampling.attention == "flash":  # before the weights load: one line where the kernel cannot run
            check_flash(torch.device(device), self.dtype, sampling.self_cot)
        self.bundle = resolve_model(model, dtype=self.dtype, device=device)
        self.sampling = sampling
        self.micro_batch_samples = micro_batch_samples
        self.run_seed = run_seed
        self.policy_version = 0

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """New policy weights from the learner (backbone + head state dict); returns the version held."""
        self.bundle.model.load_state_dict({k: v.to(self.device, self.dtype) for k, v in state_dict.items()})
        self.policy_version = version
        return version

    def pid(self) -> int:
        """The worker's process id (in-process: the driver's)."""
        return os.getpid()

    def load_checkpoint(self, directory: str, version: int) -> int:
        self.bundle = load_checkpoint(directory, dtype=self.dtype, device=self.device)
        self.policy_version = version
        return version

    def rollout(self, prompts: list[Prompt], samples_per_prompt: int, record_chains: bool = False) -> RolloutBatch:
        """G = samples_per_prompt images per prompt, sampled micro_batch_samples at a time, decoded once."""
        texts = [p.text for p in prompts for _ in range(samples_per_prompt)]
        pids = [p.id for p in prompts for _ in range(samples_per_prompt)]
        seeds = [sample_seed(p.id, k, self.run_seed) for p in prompts for k in range(samples_per_prompt)]
        parts = []
        for s in range(0, len(texts), self.micro_batch_samples):
            e = s + self.micro_batch_samples
            parts.append(sample_prompts(self.bundle, texts[s:e], seeds[s:e], self.sampling, record_chains))
        tokens = torch.cat([p.tokens for p in parts]).cpu()
        text = TextSample.concat([p.text.to("cpu") for p in parts]) if self.sampling.self_cot else None
        images = torch.cat(
            [decode_tokens(self.bundle, tokens[s : s + self.micro_batch_samples], self.sampling.image_size)
             for s in range(0, len(texts), self.micro_batch_samples)]
        )  # fmt: skip
        return RolloutBatch(
            prompts=texts, prompt_ids=pids,
            group_ids=torch.arange(len(prompts)).repeat_interleave(samples_per_prompt),
            seeds=torch.tensor(seeds, dtype=torch.long), tokens=tokens,
            chains=torch.cat([p.chains for p in parts]).cpu() if record_chains else None,
            log_probs=torch.cat([p.log_probs for p in parts]).cpu() if record_chains else None,
            images=images, policy_version=self.policy_version, sampling=self.sampling,
            text=text, texts=decode_text(self.bundle, text),
        )  # fmt: skip


class GrpoRolloutWorker(RolloutWorker):
    """A RolloutWorker whose rollouts take the step's run seed, so every GRPO step draws fresh noise
    while a sample stays a pure function of (prompt id, sample index, run seed, step, weights)."""

    def rollout_step(self, prompts: list[Prompt], samples_per_prompt: int, step_seed: int) -> RolloutBatch:
        self.run_seed = step_seed
        return self.rollout(prompts, samples_per_prompt, record_chains=True)

    def continue_prefixes(self, prompts: list[str], prefix_tokens: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Images uint8 [b, 3, S, S]: prompts[i] continued from prefix_tokens[i] [m, 64] with seeds[i]."""
        out = []
        for s in range(0, len(prompts), self.micro_batch_samples):
            e = s + self.micro_batch_samples
            res = sample_prompts(self.bundle, prompts[s:e], seeds[s:e], self.sampling,
                                 prefix_tokens=prefix_tokens[s:e].to(self.device))  # fmt: skip
            out.append(decode_tokens(self.bundle, res.tokens, self.sampling.image_size))
        return torch.cat(out)


def split_prompts(prompts: list[Prompt], num_parts: int) -> list[list[Prompt]]:
    """Consecutive, near-equal chunks of whole prompts (groups stay on one worker)."""
    n = min(num_parts, len(prompts))
    size, extra = divmod(len(prompts), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(prompts[start:end])
        start = end
    return out


def group_chunks(num_samples: int, group: int, num_parts: int) -> list[tuple[int, int]]:
    """(start, end) sample ranges of whole groups, one per worker at most."""
    num_groups = num_samples // group
    n = min(num_parts, num_groups)
    bounds = [round(i * num_groups / n) * group for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
