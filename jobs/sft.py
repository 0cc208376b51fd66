"""`nsalign sft CONFIG [key=value ...]`: supervised fine-tuning on (caption, image) pairs.

Loss = 0.01 CE(text) + 1.0 FM(image) (NextStep-1). Data (alignment/sft_data.py): a Parquet file with a
caption column and an image column (PNG/JPEG bytes), or WebDataset tar shards (a .tar, a directory of
them, or a brace pattern); images are centre-cropped, resized and encoded by the frozen VAE.
Checkpoints every `checkpoint_every` steps in the published layout + DeepSpeed state + trainer
state; the same command after a kill resumes from `latest` (same data order, same RNG).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.learner import Learner
from alignment.learner_config import LearnerConfig
from alignment.sft_data import SftDataConfig, load_pairs
from alignment.trainer import Trainer
from base_model.checkpoint import read_state_dict, resolve_model, save_published
from base_model.model import NextStepModel
from base_model.sequence import (
    DEFAULT_MAX_PROMPT_TOKENS,
    build_prompt_batch,
    check_sequence_fits,
    model_max_positions,
    truncation_note,
)
from base_model.teacher_forcing import sft_loss
from core.errors import ConfigError
from core.rng import sample_order
from core.schema import load_config


@dataclass
class SftConfig:
    run_name: str = "sft"
    runs_root: str = "runs"
    model: str = "tiny"  # checkpoint directory or a random preset (tiny, mid)
    data: SftDataConfig = field(default_factory=SftDataConfig)
    steps: int = 100
    micro_batch_samples: int = 4
    micro_batches_per_step: int = 1
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    checkpoint_every: int = 50
    keep_last: int = 3
    ema_decay: float | None = None  # e.g. 0.999: keep an EMA of the weights, saved as step_N/ema (a `select` candidate)
    caption_dropout: float = 0.0  # share of samples trained with the empty caption (the CFG branch), e.g. 0.1
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # longer captions keep their first N tokens (counted once)
    seed: int = 0
    tensorboard: bool = False
    wandb: bool = False

    def validate(self, where: str = "config") -> None:
        if not self.data.path:
            raise ConfigError(f"{where}.data.path: required (a Parquet file of caption/image rows or .tar shards)")
        if self.data.image_size <= 0 or self.data.image_size % 16:
            raise ConfigError(f"{where}.data.image_size: {self.data.image_size} is not a positive multiple of 16")
        check_sequence_fits(self.max_prompt_tokens, (self.data.image_size,) * 2, model_max_positions(self.model),
                            f"{where}.max_prompt_tokens")  # fmt: skip
        for name in ("steps", "micro_batch_samples", "micro_batches_per_step", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"{where}.caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"{where}.ema_decay: must be in (0, 1), got {self.ema_decay}")
        self.learner.validate(f"{where}.learner")

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_samples * self.micro_batches_per_step


def dropped_captions(seed: int, position: int, count: int, rate: float) -> list[bool]:
    """Whether samples `position .. position+count` of the stream train unconditionally (empty caption).
    Each sample's draw depends only on its stream position, so a resumed run drops the same samples."""
    if rate <= 0:
        return [False] * count
    draws = [torch.rand(1, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7_919 + p)) for p in
             range(position, position + count)]  # fmt: skip
    return [bool(d < rate) for d in draws]


def ema_update(ema: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], decay: float) -> None:
    """In place, every tensor: ema <- decay * ema + (1 - decay) * weights (fp32)."""
    for name, value in weights.items():
        ema[name].mul_(decay).add_(value.float(), alpha=1.0 - decay)


def refuse_several_ranks(world_size: int) -> None:
    """SFT has no data-parallel split yet: under a launcher every rank would train the same batches and
    write the same run directory, so it refuses to start rather than do that work N times."""
    if world_size > 1:
        raise ConfigError(
            f"nsalign sft runs as a single process for now (WORLD_SIZE={world_size}): start it without "
            "torchrun/deepspeed; data-parallel SFT is not implemented yet"
        )


class SftTrainer(Trainer):
    """SFT in the trainer shape: encoded data and the learner in setup, one optimizer update per step."""

    job = "sft"

    def __init__(self, config: SftConfig):
        super().__init__(config)
        self.config: SftConfig = config
        self.ema: dict[str, torch.Tensor] | None = None  # fp32 on the CPU when config.ema_decay is set

    def setup(self) -> None:
        config = self.config
        refuse_several_ranks(int(os.environ.get("WORLD_SIZE", "1")))
        self.captions, images = load_pairs(config.data)  # captions [N], images uint8 [N, 3, S, S]
        torch.manual_seed(config.seed)
        self.bundle = resolve_model(config.model, seed=config.seed)
        if note := truncation_note("sft", "max_prompt_tokens", self.bundle.tokenizer, self.captions,
                                   config.max_prompt_tokens):  # fmt: skip
            print(note)
        with torch.no_grad():  # the VAE is frozen: encode the data once
            self.tokens = torch.cat(
                [self.bundle.vae.encode(images[s : s + 64].float() / 127.5 - 1) for s in range(0, len(images), 64)]
            )  # [N, T, 64]
        self.learner = Learner(self.bundle.model.train(), config.learner)

    def describe(self) -> str:
        config = self.config
        sizes = (
            f"{config.samples_per_step} samples/step ({config.micro_batches_per_step} x {config.micro_batch_samples})"
        )
        return f"sft: {len(self.captions)} pairs, {sizes}, {config.steps} steps -> {self.run_dir}"

    def opened(self, resumed_from: Path | None) -> None:
        if self.config.ema_decay is None:
            return
        # fp32 on the CPU; saved in fp32 unless bf16, so a resume continues it exactly
        start = self.learner.policy_weights()
        self.ema = start if resumed_from is None else {**start, **read_state_dict(resumed_from / "ema", torch.float32)}

    def step(self) -> dict[str, float] | None:
        config, state = self.config, self.state
        order = sample_order(len(self.captions), config.seed, state.consumed_prompts, config.samples_per_step)
        drops = dropped_captions(config.seed, state.consumed_prompts, config.samples_per_step, config.caption_dropout)
        items = list(zip(order, drops))
        micro = [items[i : i + config.micro_batch_samples] for i in range(0, len(items), config.micro_batch_samples)]
        result = self.learner.step(micro, self.loss_fn)
        state.consumed_prompts += config.samples_per_step  # a skipped attempt passes its samples over
        if not result.updated:
            return None
        if self.ema is not None:
            ema_update(self.ema, self.learner.policy_weights(), config.ema_decay)
        return result.metrics

    def loss_fn(self, model: NextStepModel, items: list[tuple[int, bool]]) -> tuple[torch.Tensor, dict[str, float]]:
        """items: (sample index, caption dropped) of one micro batch."""
        idx = [i for i, _ in items]
        texts = ["" if drop else self.captions[i] for i, drop in items]  # "": the unconditional caption of CFG
        size = (self.config.data.image_size,) * 2
        batch = build_prompt_batch(self.bundle.tokenizer, self.bundle.ids, texts, size, False,
                                   max_prompt_tokens=self.config.max_prompt_tokens)  # fmt: skip
        out = sft_loss(model, batch, self.bundle.ids, self.tokens[idx])
        return out.loss, {"sft/text_ce": float(out.text_ce), "sft/flow_matching": float(out.flow_matching)}

    def save_extra(self, step_dir: Path) -> None:
        if self.ema is not None:
            save_published(self.bundle, self.ema, step_dir / "ema", self.checkpoint_dtype)


def run_sft(config: SftConfig) -> Path:
    """The SFT job. Returns the run directory."""
    return SftTrainer(config).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/sft/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 learner.lr=1e-5")


def run(args: argparse.Namespace) -> int:
    config = load_config(SftConfig, args.config, args.overrides)
    out = run_sft(config)
    print(f"sft: done; checkpoints in {out}")
    return 0
