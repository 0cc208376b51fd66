"""`nsalign sft CONFIG [key=value ...]`: supervised fine-tuning on (caption, image) pairs.

Loss = 0.01 CE(text) + 1.0 FM(image) (NextStep-1). Data (alignment/sft_data.py): a Parquet file with a
caption column and an image column (PNG/JPEG bytes), or WebDataset tar shards (a .tar, a directory of
them, or a brace pattern). Images stay compressed in memory until a micro batch needs them: then they are
decoded, centre-cropped, resized and encoded by the frozen VAE on the learner's device (nothing is encoded
up front, so start-up does not grow with the dataset beyond reading its bytes).

Data parallel (torchrun / deepspeed launcher): a step trains on `micro_batch_samples x
micro_batches_per_step` samples of the seeded stream whatever the number of ranks; rank r takes the r-th
contiguous share of its micro batches (micro_batches_per_step must divide by the ranks). Each micro
batch's flow-matching noise comes from a generator seeded by its stream position, so N ranks compute the
gradients one process would (averaged by DeepSpeed; metrics averaged over the ranks). Rank 0 alone writes
metrics, the published model and `latest`; every rank its DeepSpeed state.
Checkpoints every `checkpoint_every` steps in the published layout + DeepSpeed state + trainer
state; the same command after a kill resumes from `latest` (same data order, same RNG).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.learner import Learner
from alignment.learner_config import LearnerConfig
from alignment.model_source import open_model
from alignment.ranks import check_divisible, rank, rank_share, world_size
from alignment.sft_data import SftDataConfig, load_samples
from alignment.trainer import Trainer
from base_model.checkpoint import read_state_dict, save_published
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
    micro_batch_samples: int = 4  # per rank and forward pass
    micro_batches_per_step: int = 1  # over all ranks (a multiple of the number of ranks)
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
        check_divisible(f"{where}.micro_batches_per_step", self.samples_per_step, self.micro_batch_samples,
                        world_size(), "samples")  # fmt: skip
        self.learner.validate(f"{where}.learner")

    @property
    def samples_per_step(self) -> int:
        """Samples of one optimizer step over all ranks."""
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


def noise_generator(seed: int, position: int) -> torch.Generator:
    """The flow-matching (t, noise) generator of the micro batch starting at stream `position`: the same
    on any rank and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 104_729 + position)


class SftTrainer(Trainer):
    """SFT in the trainer shape: encoded data and the learner in setup, one optimizer update per step."""

    job = "sft"

    def __init__(self, config: SftConfig):
        super().__init__(config, lead=rank() == 0)
        self.config: SftConfig = config
        self.me, self.world = rank(), world_size()
        self.ema: dict[str, torch.Tensor] | None = None  # fp32 on rank 0's CPU when config.ema_decay is set

    def setup(self) -> None:
        config = self.config
        self.samples = load_samples(config.data)  # captions [N] and image bytes [N], decoded per micro batch
        self.captions = self.samples.captions
        torch.manual_seed(config.seed)
        source = open_model(config.model, seed=config.seed)
        if self.lead and (note := truncation_note("sft", "max_prompt_tokens", source.tokenizer, self.captions,
                                                  config.max_prompt_tokens)):  # fmt: skip
            print(note)
        # a rendezvous of all ranks; under ZeRO-3 the model is built partitioned (zero.Init), then loaded
        self.learner = Learner.from_source(source.build, source.read, config.learner, where=source.where)
        self.bundle = source.bundle(self.learner.model)
        self.bundle.vae.to(self.learner.device)  # frozen: encodes each micro batch where the model trains

    def describe(self) -> str:
        config = self.config
        sizes = (
            f"{config.samples_per_step} samples/step ({config.micro_batches_per_step} x {config.micro_batch_samples})"
        )
        return f"sft: {len(self.captions)} pairs, {sizes}, {config.steps} steps -> {self.run_dir}"

    def opened(self, resumed_from: Path | None) -> None:
        if self.config.ema_decay is None:
            return
        # fp32 on the CPU of rank 0; saved in fp32 unless bf16, so a resume continues it exactly
        start = self.learner.policy_weights(rank0_only=True)  # collective under ZeRO-3
        if not self.lead:
            return
        self.ema = start if resumed_from is None else {**start, **read_state_dict(resumed_from / "ema", torch.float32)}

    def step(self) -> dict[str, float] | None:
        config, state = self.config, self.state
        order = sample_order(len(self.captions), config.seed, state.consumed_prompts, config.samples_per_step)
        drops = dropped_captions(config.seed, state.consumed_prompts, config.samples_per_step, config.caption_dropout)
        positions = range(state.consumed_prompts, state.consumed_prompts + config.samples_per_step)
        stream = list(zip(order, drops, positions))  # (sample index, caption dropped, stream position)
        items = [stream[i] for i in rank_share(len(stream), self.me, self.world)]  # this rank's contiguous share
        micro = [items[i : i + config.micro_batch_samples] for i in range(0, len(items), config.micro_batch_samples)]
        result = self.learner.step(micro, self.loss_fn)
        state.consumed_prompts += config.samples_per_step  # a skipped attempt passes its samples over
        if not result.updated:
            return None
        if config.ema_decay is not None:
            weights = self.learner.policy_weights(rank0_only=True)  # every rank: collective under ZeRO-3
            if self.ema is not None:
                ema_update(self.ema, weights, config.ema_decay)
        return result.metrics

    def encode(self, indices: list[int]) -> torch.Tensor:
        """Image tokens [B, T, 64] of samples `indices`: decoded now, encoded by the frozen VAE on its device."""
        images = self.samples.images(indices).to(self.learner.device)  # uint8 [B, 3, S, S]
        vae = self.bundle.vae
        with torch.no_grad():
            return vae.encode(images.to(next(vae.parameters()).dtype) / 127.5 - 1).float()

    def loss_fn(
        self, model: NextStepModel, items: list[tuple[int, bool, int]]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """items: (sample index, caption dropped, stream position) of one micro batch."""
        idx = [i for i, _, _ in items]
        texts = ["" if drop else self.captions[i] for i, drop, _ in items]  # "": the unconditional caption of CFG
        size = (self.config.data.image_size,) * 2
        batch = build_prompt_batch(self.bundle.tokenizer, self.bundle.ids, texts, size, False,
                                   max_prompt_tokens=self.config.max_prompt_tokens)  # fmt: skip
        generator = noise_generator(self.config.seed, items[0][2])
        out = sft_loss(model, batch, self.bundle.ids, self.encode(idx), generator=generator)
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
    if rank() == 0:
        print(f"sft: done; checkpoints in {out}")
    return 0
