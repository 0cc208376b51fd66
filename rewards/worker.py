"""RewardWorker: holds the configured rewards on one device and scores batches.

A plain class: it runs in-process (core.pools.LocalPool) or as a Ray actor (RayPool) unchanged,
e.g. `make_pool(RewardWorker, (config,), config.pool)` then `pool.map("score", [(images, prompts), ...])`.
Images are scored `micro_batch_images` at a time; outputs are CPU float32 so they travel cheaply.
"""

from __future__ import annotations

import torch

from rewards.base import RewardOutput, RewardsConfig
from rewards.composite import build_composite


class RewardWorker:
    """The configured composite reward on one device, scoring whole batches."""

    def __init__(self, config: RewardsConfig, device: str | None = None, num_threads: int | None = None):
        """device: overrides config.device (e.g. the GPU Ray assigned); num_threads: torch CPU threads."""
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.config = config
        self.reward = build_composite(config, device)
        self.micro_batch_images = config.micro_batch_images

    def names(self) -> list[str]:
        """Configured reward names, in order."""
        return list(self.reward.names)

    def score(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """uint8 [B, 3, H, W] + B prompts -> RewardOutput(scores [B], components {name: [B]}).

        Each reward runs `micro_batch_images` images at a time; normalisation and weighting then run
        once on the whole batch, so running statistics do not depend on the micro-batch size.
        """
        step = self.micro_batch_images
        parts = [
            self.reward.score_each(images[s : s + step], prompts[s : s + step]) for s in range(0, len(prompts), step)
        ]
        outputs = {name: concat([p[name] for p in parts]) for name in self.reward.names}
        return self.reward.combine(outputs)

    def state_dict(self) -> dict:
        """Running-normalisation statistics (to save with a checkpoint)."""
        return self.reward.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reward.load_state_dict(state)


def concat(outputs: list[RewardOutput]) -> RewardOutput:
    """Outputs of consecutive micro-batches -> one output over the whole batch."""
    return RewardOutput(
        scores=torch.cat([o.scores for o in outputs]),
        components={k: torch.cat([o.components[k] for o in outputs]) for k in outputs[0].components},
    )
