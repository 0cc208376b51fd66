"""`nsalign sft CONFIG [key=value ...]`: supervised fine-tuning on (caption, image) pairs.

Loss = 0.01 CE(text) + 1.0 FM(image) (NextStep-1). Data (alignment/sft_data.py): a Parquet file with a
caption column and an image column (PNG/JPEG bytes), or WebDataset tar shards (a .tar, a directory of
them, or a brace pattern); images are centre-cropped, resized and encoded by the frozen VAE.
Checkpoints every `checkpoint_every` steps in the published layout + DeepSpeed state + trainer
state; the same command after a kill resumes from `latest` (same data order, same RNG).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.learner import LearnerConfig
from alignment.sft_data import load_pairs
from base_model.errors import ConfigError
from base_model.schema import load_config, to_dict


@dataclass
class SftDataConfig:
    path: str = ""  # Parquet file, or WebDataset shards: a .tar, a directory of .tar, or shard-{000..009}.tar
    caption_field: str = "caption"  # Parquet column; WebDataset: the .json field (else `prompt`)
    image_field: str = "image"  # Parquet column (WebDataset: the .png/.jpg/.jpeg/.webp file)
    image_size: int = 64  # pixels per side; multiple of 16


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
    seed: int = 0
    tensorboard: bool = False
    wandb: bool = False

    def validate(self, where: str = "config") -> None:
        if not self.data.path:
            raise ConfigError(f"{where}.data.path: required (a Parquet file of caption/image rows or .tar shards)")
        if self.data.image_size <= 0 or self.data.image_size % 16:
            raise ConfigError(f"{where}.data.image_size: {self.data.image_size} is not a positive multiple of 16")
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


def sample_order(num_items: int, seed: int, position: int, count: int) -> list[int]:
    """Items `position .. position+count` of an endless stream of seeded epoch permutations."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(position + len(out), num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset : offset + count - len(out)].tolist())
    return out


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


def run_sft(cfg: SftConfig) -> Path:
    """The SFT job. Returns the run directory."""
    from tqdm.auto import tqdm

    from alignment.learner import Learner
    from alignment.runs import (
        MetricsLogger,
        TrainerState,
        checkpoint_dir,
        finish_checkpoint,
        latest_checkpoint,
        load_trainer_state,
        prepare_run_dir,
        save_published,
    )  # fmt: skip
    from base_model.checkpoint import read_state_dict, resolve_model
    from base_model.sequence import build_prompt_batch
    from base_model.teacher_forcing import sft_loss

    captions, images = load_pairs(cfg.data)
    run = prepare_run_dir(cfg.runs_root, cfg.run_name, to_dict(cfg))
    print(f"sft: {len(captions)} pairs, {cfg.samples_per_step} samples/step "
          f"({cfg.micro_batches_per_step} x {cfg.micro_batch_samples}), {cfg.steps} steps -> {run}")  # fmt: skip
    torch.manual_seed(cfg.seed)
    bundle = resolve_model(cfg.model, seed=cfg.seed)
    with torch.no_grad():  # the VAE is frozen: encode the data once
        tokens = torch.cat(
            [bundle.vae.encode(images[s : s + 64].float() / 127.5 - 1) for s in range(0, len(images), 64)]
        )
    learner = Learner(bundle.model.train(), cfg.learner)
    state = TrainerState()
    resume_from = latest_checkpoint(run)
    if resume_from is not None:
        learner.load_state(resume_from)
        state = load_trainer_state(resume_from)
        print(f"sft: resumed from {resume_from.name} (step {state.step})")
    ema = None
    if cfg.ema_decay is not None:  # fp32 on the CPU; saved in fp32 unless bf16, so a resume continues it exactly
        start = learner.policy_weights()
        ema = start if resume_from is None else {**start, **read_state_dict(resume_from / "ema", torch.float32)}
    logger = MetricsLogger(run, tensorboard=cfg.tensorboard, wandb=cfg.wandb)
    logger.truncate_after(state.step)
    size = (cfg.data.image_size, cfg.data.image_size)

    def loss_fn(model, items: list[tuple[int, bool]]):
        idx = [i for i, _ in items]
        texts = ["" if drop else captions[i] for i, drop in items]  # "": the unconditional caption of CFG
        batch = build_prompt_batch(bundle.tokenizer, bundle.ids, texts, size, False)
        out = sft_loss(model, batch, bundle.ids, tokens[idx])
        return out.loss, {"sft/text_ce": float(out.text_ce), "sft/flow_matching": float(out.flow_matching)}

    progress = tqdm(range(state.step, cfg.steps), initial=state.step, total=cfg.steps, desc="sft")
    for _ in progress:
        order = sample_order(len(captions), cfg.seed, state.consumed_prompts, cfg.samples_per_step)
        drops = dropped_captions(cfg.seed, state.consumed_prompts, cfg.samples_per_step, cfg.caption_dropout)
        items = list(zip(order, drops))
        micro = [items[i : i + cfg.micro_batch_samples] for i in range(0, len(items), cfg.micro_batch_samples)]
        updates_before = learner.step_count
        metrics = learner.step(micro, loss_fn)
        if ema is not None and learner.step_count > updates_before:  # a skipped step leaves the EMA alone
            ema_update(ema, learner.policy_weights(), cfg.ema_decay)
        state.consumed_prompts += cfg.samples_per_step
        state.step = learner.step_count
        state.num_skipped_steps = learner.num_skipped
        logger.log(state.step, metrics)
        progress.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}")
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            step_dir = checkpoint_dir(run, state.step)
            dtype = torch.bfloat16 if cfg.learner.bf16 else None
            save_published(bundle, learner.policy_weights(), step_dir / "model", dtype)
            if ema is not None:
                save_published(bundle, ema, step_dir / "ema", dtype)
            learner.save_state(step_dir)
            finish_checkpoint(run, step_dir, state, cfg.keep_last)
    logger.close()
    return run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/sft/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 learner.lr=1e-5")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(SftConfig, args.config, args.overrides)
    out = run_sft(cfg)
    print(f"sft: done; checkpoints in {out}")
    return 0
