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

from alignment.learner import LearnerConfig
from alignment.sft_data import load_pairs
from base_model.errors import ConfigError
from base_model.schema import load_config, to_dict
from base_model.sequence import DEFAULT_MAX_PROMPT_TOKENS, check_sequence_fits, model_max_positions


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


def refuse_several_ranks(world_size: int) -> None:
    """SFT has no data-parallel split yet: under a launcher every rank would train the same batches and
    write the same run directory, so it refuses to start rather than do that work N times."""
    if world_size > 1:
        raise ConfigError(
            f"nsalign sft runs as a single process for now (WORLD_SIZE={world_size}): start it without "
            "torchrun/deepspeed; data-parallel SFT is not implemented yet"
        )


def run_sft(cfg: SftConfig) -> Path:
    """The SFT job. Returns the run directory."""
    refuse_several_ranks(int(os.environ.get("WORLD_SIZE", "1")))
    from tqdm.auto import tqdm

    from alignment.learner import Learner, NonFiniteLossError
    from alignment.runs import (
        MetricsLogger,
        TrainerState,
        finish_checkpoint,
        latest_checkpoint,
        load_trainer_state,
        lock_dir,
        nonfinite_stop,
        prepare_run_dir,
        save_published,
        staging_dir,
    )  # fmt: skip
    from base_model.checkpoint import read_state_dict, resolve_model
    from base_model.sequence import build_prompt_batch, truncation_note
    from base_model.teacher_forcing import sft_loss

    # 1. inputs, model, encoded data and learner: all checked before the run directory exists, so a bad
    # model path leaves nothing that a corrected command would be refused against
    captions, images = load_pairs(cfg.data)
    torch.manual_seed(cfg.seed)
    bundle = resolve_model(cfg.model, seed=cfg.seed)
    if note := truncation_note("sft", "max_prompt_tokens", bundle.tokenizer, captions, cfg.max_prompt_tokens):
        print(note)
    with torch.no_grad():  # the VAE is frozen: encode the data once
        tokens = torch.cat(
            [bundle.vae.encode(images[s : s + 64].float() / 127.5 - 1) for s in range(0, len(images), 64)]
        )
    learner = Learner(bundle.model.train(), cfg.learner)

    # 2. the run directory, locked for the job's life; resume
    with lock_dir(Path(cfg.runs_root) / cfg.run_name, "sft"):
        run = prepare_run_dir(cfg.runs_root, cfg.run_name, to_dict(cfg))
        print(f"sft: {len(captions)} pairs, {cfg.samples_per_step} samples/step "
              f"({cfg.micro_batches_per_step} x {cfg.micro_batch_samples}), {cfg.steps} steps -> {run}")  # fmt: skip
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
            batch = build_prompt_batch(bundle.tokenizer, bundle.ids, texts, size, False,
                                       max_prompt_tokens=cfg.max_prompt_tokens)  # fmt: skip
            out = sft_loss(model, batch, bundle.ids, tokens[idx])
            return out.loss, {"sft/text_ce": float(out.text_ce), "sft/flow_matching": float(out.flow_matching)}

        # 3. the loop: a step is an optimizer update; an attempt skipped for a non-finite loss passes its
        # batch over and is no step (no metrics row, no checkpoint), until too many in a row stop the job
        progress = tqdm(initial=state.step, total=cfg.steps, desc="sft")
        while state.step < cfg.steps:
            order = sample_order(len(captions), cfg.seed, state.consumed_prompts, cfg.samples_per_step)
            drops = dropped_captions(cfg.seed, state.consumed_prompts, cfg.samples_per_step, cfg.caption_dropout)
            items = list(zip(order, drops))
            micro = [items[i : i + cfg.micro_batch_samples] for i in range(0, len(items), cfg.micro_batch_samples)]
            updates_before = learner.step_count
            try:
                metrics = learner.step(micro, loss_fn)
            except NonFiniteLossError as e:
                progress.close()  # the error line then starts a line of its own
                logger.close()
                raise nonfinite_stop(run, e) from None
            state.consumed_prompts += cfg.samples_per_step
            if learner.step_count == updates_before:  # skipped: weights, EMA and step unchanged
                continue
            if ema is not None:
                ema_update(ema, learner.policy_weights(), cfg.ema_decay)
            state.step = learner.step_count
            state.num_skipped_steps = learner.num_skipped
            logger.log(state.step, metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}")
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                step_dir = staging_dir(run, state.step)  # renamed to step_N by finish_checkpoint
                dtype = torch.bfloat16 if cfg.learner.bf16 else None
                save_published(bundle, learner.policy_weights(), step_dir / "model", dtype)
                if ema is not None:
                    save_published(bundle, ema, step_dir / "ema", dtype)
                learner.save_state(step_dir)
                finish_checkpoint(run, step_dir, state, cfg.keep_last)
        progress.close()
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
