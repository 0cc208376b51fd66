"""`nsalign sft CONFIG [key=value ...]`: supervised fine-tuning on (caption, image) pairs.

Loss = 0.01 CE(text) + 1.0 FM(image) (NextStep-1; `lm_loss_weight` overrides the 0.01). Data
(alignment/sft_data.py): a Parquet file with a caption column and an image column (PNG/JPEG bytes), or
WebDataset tar shards (a .tar, a directory of them, or a brace pattern). Images stay compressed in memory
until a micro batch needs them: then they are decoded, centre-cropped, resized and encoded by the frozen
VAE on the learner's device (nothing is encoded up front, so start-up does not grow with the dataset beyond
reading its bytes).

Data parallel (torchrun / deepspeed launcher): a step trains on `micro_batch_samples x
micro_batches_per_step` samples of the seeded stream whatever the number of ranks; rank r takes the r-th
contiguous share of its micro batches (micro_batches_per_step must divide by the ranks). Each micro
batch's flow-matching noise comes from a generator seeded by its stream position, so N ranks compute the
gradients one process would (averaged by DeepSpeed; metrics averaged over the ranks). Rank 0 alone writes
metrics, the published model and `latest`; every rank its DeepSpeed state.
Checkpoints every `checkpoint_every` steps in the published layout + DeepSpeed state + trainer
state; the same command after a kill resumes from `latest` (same data order, same RNG).

Self-CoT SFT: with `data.reasoning_field` (each sample's reasoning text) and `cot_fraction` > 0, that share
of samples (drawn per stream position, like caption dropout, so a resume and N ranks agree) trains the
Self-CoT layout of base_model/text.py: the caption wrapped in `cot.template`, the reasoning (tokenized on
its own, add_special_tokens=False), <|image_area|> "h*w" <|boi|>, the image. The text CE then covers the
reasoning and its stop (the <|image_area|> after it), so a sampler with the same `cot.template` makes the
model write its reasoning, then draw. The other samples (and every caption-dropout one) keep the plain
layout; a micro batch with both runs one teacher-forced pass per layout, each pass's loss weighted by its
share of the micro batch's samples. With cot_fraction 0 (or no reasoning field) training is exactly the
plain SFT.
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
    PromptBatch,
    build_prompt_batch,
    build_self_cot_batch,
    check_sequence_fits,
    model_max_positions,
    truncation_note,
)
from base_model.teacher_forcing import sft_loss
from base_model.text import CotConfig
from base_model.tokenizer import SpecialIds
from core.errors import ConfigError, UserError
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
    # Self-CoT SFT (module docstring): share of samples trained as template(caption) + reasoning + image; needs
    # data.reasoning_field. The sampler must use the same cot.template; reasonings longer than
    # cot.max_text_tokens are refused
    cot_fraction: float = 0.0
    cot: CotConfig = field(default_factory=CotConfig)
    lm_loss_weight: float | None = None  # weight of the text CE (None: the model config's, 0.01 as published)
    seed: int = 0
    tensorboard: bool = False
    wandb: bool = False

    def validate(self, where: str = "config") -> None:
        if not self.data.path:
            raise ConfigError(f"{where}.data.path: required (a Parquet file of caption/image rows or .tar shards)")
        if self.data.image_size <= 0 or self.data.image_size % 16:
            raise ConfigError(f"{where}.data.image_size: {self.data.image_size} is not a positive multiple of 16")
        check_sequence_fits(self.max_prompt_tokens, (self.data.image_size,) * 2, model_max_positions(self.model),
                            f"{where}.max_prompt_tokens", text_tokens=self.cot_text_tokens)  # fmt: skip
        for name in ("steps", "micro_batch_samples", "micro_batches_per_step", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"{where}.caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.cot_fraction <= 1.0:
            raise ConfigError(f"{where}.cot_fraction: must be in [0, 1], got {self.cot_fraction}")
        if self.cot_fraction > 0 and self.data.reasoning_field is None:
            raise ConfigError(f"{where}.cot_fraction: {self.cot_fraction} needs data.reasoning_field (the column "
                              "of each sample's reasoning text)")  # fmt: skip
        self.cot.validate(f"{where}.cot")
        if self.lm_loss_weight is not None and not self.lm_loss_weight >= 0.0:
            raise ConfigError(f"{where}.lm_loss_weight: must be >= 0, got {self.lm_loss_weight}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"{where}.ema_decay: must be in (0, 1), got {self.ema_decay}")
        check_divisible(f"{where}.micro_batches_per_step", self.samples_per_step, self.micro_batch_samples,
                        world_size(), "samples")  # fmt: skip
        self.learner.validate(f"{where}.learner")

    @property
    def cot_text_tokens(self) -> int:
        """Positions a Self-CoT row needs beyond a plain one: template + reasoning (0 without Self-CoT)."""
        return self.cot.text_tokens if self.cot_fraction > 0 else 0

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


def cot_samples(seed: int, position: int, count: int, fraction: float) -> list[bool]:
    """Whether samples `position .. position+count` of the stream are drawn for the Self-CoT layout; like
    `dropped_captions`, each draw depends only on the stream position (its own salt)."""
    if fraction <= 0:
        return [False] * count
    draws = [torch.rand(1, generator=torch.Generator().manual_seed(seed * 1_000_003 + 15_485_863 + p)) for p in
             range(position, position + count)]  # fmt: skip
    return [bool(d < fraction) for d in draws]


def reasoning_ids(tokenizer, reasonings: list[str], max_text_tokens: int, where: list[str]) -> list[list[int]]:
    """Token ids of each reasoning (add_special_tokens=False); UserError naming the row of one longer than
    `max_text_tokens` (the sampler could never write it)."""
    rows = [list(r) for r in tokenizer(reasonings, add_special_tokens=False)["input_ids"]] if reasonings else []
    for row, place in zip(rows, where):
        if len(row) > max_text_tokens:
            raise UserError(f"{place}: reasoning of {len(row)} tokens is longer than cot.max_text_tokens="
                            f"{max_text_tokens}")  # fmt: skip
    return rows


def sft_batch(
    tokenizer,
    ids: SpecialIds,
    captions: list[str],
    texts: list[list[int]] | None,
    image_hw: tuple[int, int],
    cot: CotConfig,
    max_prompt_tokens: int,
) -> PromptBatch:
    """SFT rows before the image block. texts None: the plain layout, caption ("" for a dropped one: the
    unconditional caption of CFG) + <|image_area|> "h*w" <|boi|>; texts [B] token ids: the Self-CoT layout,
    template(caption) + reasoning + <|image_area|> "h*w" <|boi|>, with row-local positions."""
    if texts is None:
        return build_prompt_batch(tokenizer, ids, captions, image_hw, False, max_prompt_tokens=max_prompt_tokens)
    return build_self_cot_batch(tokenizer, ids, captions, image_hw, False, cot, texts=texts,
                                max_prompt_tokens=max_prompt_tokens)  # fmt: skip


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
        self.reasoning_tally = [0.0, 0]  # Self-CoT: the step's reasoning NLL sum and its count

    def setup(self) -> None:
        config = self.config
        self.samples = load_samples(config.data)  # captions [N] and image bytes [N], decoded per micro batch
        self.captions = self.samples.captions
        torch.manual_seed(config.seed)
        source = open_model(config.model, seed=config.seed)
        self.reasonings = None  # [N] token ids of each sample's reasoning (Self-CoT SFT only)
        if config.cot_fraction > 0:
            self.reasonings = reasoning_ids(source.tokenizer, self.samples.reasonings, config.cot.max_text_tokens,
                                            self.samples.where)  # fmt: skip
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
        cots = cot_samples(config.seed, state.consumed_prompts, config.samples_per_step, config.cot_fraction)
        positions = range(state.consumed_prompts, state.consumed_prompts + config.samples_per_step)
        # (sample index, caption dropped, stream position, Self-CoT layout); a dropped caption is never CoT
        stream = [(i, d, p, c and not d) for i, d, p, c in zip(order, drops, positions, cots)]
        items = [stream[i] for i in rank_share(len(stream), self.me, self.world)]  # this rank's contiguous share
        micro = [items[i : i + config.micro_batch_samples] for i in range(0, len(items), config.micro_batch_samples)]
        self.reasoning_tally = [0.0, 0]  # this step's reasoning NLL sum and count (tokens + stop events)
        result = self.learner.step(micro, self.loss_fn)
        state.consumed_prompts += config.samples_per_step  # a skipped attempt passes its samples over
        if not result.updated:
            return None
        if config.cot_fraction > 0:  # every rank (a collective): NLL per reasoning token over the whole step
            total, count = self.reasoning_tally
            sums = self.learner.mean_over_ranks({"nll": total, "count": float(count)})
            result.metrics["sft/reasoning_nll"] = sums["nll"] / sums["count"] if sums["count"] else float("nan")
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
        self, model: NextStepModel, items: list[tuple[int, bool, int, bool]]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """items: (sample index, caption dropped, stream position, Self-CoT layout) of one micro batch. One
        teacher-forced pass per layout (plain first), weighted by its share of the samples. With cot_fraction > 0
        both passes always run, a layout absent from the micro batch on a stand-in sample with weight 0: ZeRO-3
        gathers parameters module call by module call, so every rank must make the same calls."""
        generator = noise_generator(self.config.seed, items[0][2])
        groups = [(False, [it for it in items if not it[3]]), (True, [it for it in items if it[3]])]
        loss, metrics = None, {"sft/text_ce": 0.0, "sft/flow_matching": 0.0}
        for cot, group in groups:
            if not group and self.config.cot_fraction <= 0:
                continue
            share = len(group) / len(items)
            part, text_ce, fm = self.layout_loss(model, group or [(*items[0][:3], cot)], cot, generator, share > 0)
            if share < 1.0:
                part = share * part
            loss = part if loss is None else loss + part
            metrics["sft/text_ce"] += share * text_ce
            metrics["sft/flow_matching"] += share * fm
        if self.config.cot_fraction > 0:
            metrics["sft/cot_share"] = len(groups[1][1]) / len(items)
        return loss, metrics

    def layout_loss(
        self,
        model: NextStepModel,
        items: list[tuple[int, bool, int, bool]],
        cot: bool,
        generator: torch.Generator,
        tally: bool = True,
    ) -> tuple[torch.Tensor, float, float]:
        """NextStep-1's SFT loss (lm_loss_weight CE(text) + im_loss_weight FM(image)) of samples all in one
        layout -> (loss, text CE, FM); CoT rows add their reasoning's NLL (tokens and stop events) to the
        step's `reasoning_tally` (unless `tally` is False: a stand-in)."""
        idx = [i for i, _, _, _ in items]
        batch = self.prompt_batch(items, cot)
        out = sft_loss(model, batch, self.bundle.ids, self.encode(idx), generator, self.config.lm_loss_weight)
        if cot and tally:
            self.reasoning_tally[0] += float(-out.text_log_probs.sum())
            self.reasoning_tally[1] += int(batch.text_lengths.sum()) + len(items)  # every token, each stop event
        return out.loss, float(out.text_ce), float(out.flow_matching)

    def prompt_batch(self, items: list[tuple[int, bool, int, bool]], cot: bool) -> PromptBatch:
        """The rows of `sft_batch` for samples all in one layout."""
        captions = ["" if drop else self.captions[i] for i, drop, _, _ in items]
        texts = [self.reasonings[i] for i, _, _, _ in items] if cot else None
        return sft_batch(self.bundle.tokenizer, self.bundle.ids, captions, texts, (self.config.data.image_size,) * 2,
                         self.config.cot, self.config.max_prompt_tokens)  # fmt: skip

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
