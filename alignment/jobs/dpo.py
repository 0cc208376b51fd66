"""`nsalign dpo CONFIG [key=value ...]`: Diffusion-DPO of NextStep-1 on a build-prefs dataset.

Diffusion-DPO (Wallace et al., arXiv 2311.12908) moved to the flow head (algorithms.md §4): per pair
(c, y_w, y_l), one teacher-forced pass gives every image token's condition h_j, and the per-image flow
error l(y) = mean_j ||head(x_t^j, t_j, h_j) - (y_j - e_j)||^2 / 64 uses the SAME (t_j, e_j) for winner
and loser, policy and reference. L = -log sigmoid(-(beta/2) [(l(y_w) - l_ref(y_w)) - (l(y_l) - l_ref(y_l))]).
Gradients reach the head and, through h_j, the backbone. The reference is the frozen starting model
(a second copy), or the policy with its LoRA adapters disabled when `learner.lora` is set.

Departures from the paper: each image token draws its own t_j ~ logit-normal and e_j (NextStep's
training distribution), not one t per image; (t, e) of a pair come from a generator seeded by
(seed, position in the pair stream), so a resumed run and any world size see the same noise.
Under torchrun each rank takes a contiguous slice of every step's pairs; rank 0 alone writes the
published model, metrics and `latest`; every rank writes its DeepSpeed state.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.learner import LearnerConfig
from base_model.errors import ConfigError, UserError
from base_model.schema import load_config, to_dict
from base_model.sequence import DEFAULT_MAX_PROMPT_TOKENS, check_sequence_fits, truncation_note


@dataclass
class DpoDataConfig:
    path: str = ""  # build-prefs output directory (or one shard file)
    eval_fraction: float = 0.0  # share of prompts held out (all their pairs), chosen by prompt hash


@dataclass
class DpoConfig:
    run_name: str = "dpo"
    runs_root: str = "runs"
    model: str = "tiny"  # checkpoint directory or a random preset (tiny, mid): policy and reference start here
    data: DpoDataConfig = field(default_factory=DpoDataConfig)
    beta: float = 2500.0  # scale of the error difference; depends on how the error is averaged (see §4)
    chosen_fm_weight: float = 0.0  # lambda of an extra flow-matching loss on the winners (RPO-style; 0 = off)
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # longer prompts keep their first N tokens (counted once)
    steps: int = 100
    pairs_per_step: int = 8  # over all ranks
    micro_batch_pairs: int = 4  # per rank and forward pass (2x this many images)
    eval_every: int = 50  # steps between held-out evaluations (with data.eval_fraction > 0)
    eval_micro_batch_pairs: int = 16
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    checkpoint_every: int = 50
    keep_last: int = 3
    seed: int = 0
    tensorboard: bool = False
    wandb: bool = False

    def validate(self, where: str = "config") -> None:
        if not self.data.path:
            raise ConfigError(f"{where}.data.path: required (a build-prefs output directory)")
        if not 0.0 <= self.data.eval_fraction < 1.0:
            raise ConfigError(f"{where}.data.eval_fraction: must be in [0, 1), got {self.data.eval_fraction}")
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta: must be > 0, got {self.beta}")
        if self.chosen_fm_weight < 0:
            raise ConfigError(f"{where}.chosen_fm_weight: must be >= 0, got {self.chosen_fm_weight}")
        if self.max_prompt_tokens < 1:  # the fit to the model is checked once the dataset's image size is known
            raise ConfigError(f"{where}.max_prompt_tokens: must be >= 1, got {self.max_prompt_tokens}")
        for name in ("steps", "pairs_per_step", "micro_batch_pairs", "eval_every", "eval_micro_batch_pairs",
                     "checkpoint_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        world = world_size()
        if self.pairs_per_step % (self.micro_batch_pairs * world):
            raise ConfigError(
                f"{where}.pairs_per_step: {self.pairs_per_step} is not a multiple of micro_batch_pairs x ranks "
                f"({self.micro_batch_pairs} x {world})"
            )
        self.learner.validate(f"{where}.learner")

    def pairs_per_rank(self) -> int:
        return self.pairs_per_step // world_size()


def world_size() -> int:
    """Ranks of this job as the launcher (torchrun, deepspeed) announces them; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


# -- data -----------------------------------------------------------------------------------------


@dataclass
class PairSplit:
    train: list[int]  # pair indices trained on
    eval: list[int]  # pair indices held out (every pair of the held-out prompts)
    num_train_prompts: int
    num_eval_prompts: int


def split_by_prompt(prompts: list[str], eval_fraction: float) -> PairSplit:
    """Hold out round(eval_fraction * #prompts) prompts (at least 1 when the fraction is > 0), chosen by the
    sha1 of their text: deterministic, independent of seed, order and world size."""
    unique = sorted(set(prompts), key=lambda p: hashlib.sha1(p.encode("utf-8")).hexdigest())
    num_eval = max(1, round(eval_fraction * len(unique))) if eval_fraction > 0 else 0
    if num_eval >= len(unique):
        raise UserError(f"data.eval_fraction={eval_fraction} holds out all {len(unique)} prompts; lower it")
    held_out = set(unique[:num_eval])
    return PairSplit(
        train=[i for i, p in enumerate(prompts) if p not in held_out],
        eval=[i for i, p in enumerate(prompts) if p in held_out],
        num_train_prompts=len(unique) - num_eval, num_eval_prompts=num_eval,
    )  # fmt: skip


TRAIN_STREAM, EVAL_STREAM = 0, 1


def pair_noise(seed: int, stream: int, position: int, num_tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [T] ~ sigmoid(N(0,1)), e [T, D] ~ N(0, I)) of one pair, a pure function of (seed, stream, position)."""
    digest = hashlib.sha1(f"{seed}:{stream}:{position}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    t = torch.sigmoid(torch.randn(num_tokens, generator=g))
    return t, torch.randn(num_tokens, dim, generator=g)


@dataclass
class PairBatch:
    prompts: list[str]  # [N]
    chosen: torch.Tensor  # [N, T, 64] winner tokens y_w
    rejected: torch.Tensor  # [N, T, 64] loser tokens y_l
    t: torch.Tensor  # [N, T] per-token flow times, shared by winner, loser, policy and reference
    noise: torch.Tensor  # [N, T, 64] per-token noise e_j, shared likewise


def make_batch(pairs, indices: list[int], positions: list[int], seed: int, stream: int) -> PairBatch:
    """Pairs `indices` of a PreferencePairs; `positions` (one per pair) seed their (t, e)."""
    _, num_tokens, dim = pairs.chosen_tokens.shape
    noise = [pair_noise(seed, stream, p, num_tokens, dim) for p in positions]
    return PairBatch(
        prompts=[pairs.prompts[i] for i in indices],
        chosen=pairs.chosen_tokens[indices], rejected=pairs.rejected_tokens[indices],
        t=torch.stack([n[0] for n in noise]), noise=torch.stack([n[1] for n in noise]),
    )  # fmt: skip


# -- maths ----------------------------------------------------------------------------------------


def pair_errors(
    model, tokenizer, ids, batch: PairBatch, image_size: int, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image flow errors (l(y_w) [N], l(y_l) [N]) from ONE teacher-forced pass over 2N rows."""
    from base_model.sequence import build_prompt_batch
    from base_model.teacher_forcing import per_image_flow_error, teacher_forced

    device = model.device
    prompt_batch = build_prompt_batch(tokenizer, ids, batch.prompts * 2, (image_size, image_size), False,
                                      max_prompt_tokens=max_prompt_tokens)  # fmt: skip
    tokens = torch.cat([batch.chosen, batch.rejected]).to(device)  # [2N, T, 64]
    cond = teacher_forced(model, prompt_batch, ids, tokens).image_cond  # [2N, T, H]
    t = batch.t.repeat(2, 1).to(device)  # [2N, T]: the same (t, e) for winner and loser
    noise = batch.noise.repeat(2, 1, 1).to(device)  # [2N, T, 64]
    err = per_image_flow_error(model, cond, tokens, t, noise)  # [2N] fp32
    n = len(batch.prompts)
    return err[:n], err[n:]


METRICS = ("loss", "implicit_accuracy", "margin", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l")


def dpo_metrics(out, area: str) -> dict[str, float]:
    """DpoOutput -> {area/loss, area/implicit_accuracy, area/margin, area/mse_w, ...}."""
    return {f"{area}/{name}": float(getattr(out, name).detach()) for name in METRICS}


# -- the job --------------------------------------------------------------------------------------


def check_pairs_fit(pairs, bundle, where: str) -> None:
    """Token shapes of the dataset against the model: [N, (S/16)^2, token_dim]."""
    from base_model.sequence import grid_for_size

    _, num_tokens, dim = pairs.chosen_tokens.shape
    h, w = grid_for_size(pairs.image_size, pairs.image_size)
    if num_tokens != h * w or dim != bundle.model.config.token_dim:
        raise UserError(
            f"{where}: tokens of shape [{num_tokens}, {dim}] do not fit the model "
            f"({h * w} tokens of {bundle.model.config.token_dim} dims at {pairs.image_size}px)"
        )


def run_dpo(cfg: DpoConfig) -> Path:
    """The DPO job (every rank runs it). Returns the run directory."""
    from tqdm.auto import tqdm

    from alignment.jobs.sft import sample_order
    from alignment.learner import Learner, NonFiniteLossError
    from alignment.losses import diffusion_dpo_loss
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
    from base_model.checkpoint import resolve_model
    from rollout.prefs_format import read_pairs

    # 1. inputs, all checked before anything is written
    pairs = read_pairs(cfg.data.path)
    split = split_by_prompt(pairs.prompts, cfg.data.eval_fraction)
    bundle = resolve_model(cfg.model, seed=cfg.seed)
    check_pairs_fit(pairs, bundle, cfg.data.path)
    check_sequence_fits(cfg.max_prompt_tokens, (pairs.image_size,) * 2, bundle.model.config.max_position_embeddings,
                        f"{cfg.data.path}: max_prompt_tokens")  # fmt: skip
    me, world, lead = rank(), world_size(), rank() == 0
    run = Path(cfg.runs_root) / cfg.run_name
    # the run directory: locked by rank 0 for the job's life (the other ranks only write checkpoints into it)
    with lock_dir(run, "dpo") if lead else nullcontext():
        if lead:
            run = prepare_run_dir(cfg.runs_root, cfg.run_name, to_dict(cfg))
            per_rank = cfg.pairs_per_rank()
            print(f"dpo: {len(split.train)} train pairs ({split.num_train_prompts} prompts), {len(split.eval)} "
                  f"held-out pairs ({split.num_eval_prompts} prompts); {pairs.chosen_tokens.shape[1]} tokens/image at "
                  f"{pairs.image_size}px; {cfg.pairs_per_step} pairs/step = {world} ranks x "
                  f"{per_rank // cfg.micro_batch_pairs} micro batches x {cfg.micro_batch_pairs} pairs; {cfg.steps} "
                  f"steps (~{cfg.steps * cfg.pairs_per_step / len(split.train):.1f} epochs); beta {cfg.beta}; "
                  f"{'LoRA' if cfg.learner.lora else 'full'} fine-tuning -> {run}")  # fmt: skip
            unique = sorted(set(pairs.prompts))
            if note := truncation_note("dpo", "max_prompt_tokens", bundle.tokenizer, unique, cfg.max_prompt_tokens):
                print(note)

        # 2. policy + frozen reference, resume
        torch.manual_seed(cfg.seed)
        learner = Learner(bundle.model.train(), cfg.learner, reference=True)  # a rendezvous of all ranks
        state = TrainerState(extra={"consumed_pairs": 0})
        resume_from = latest_checkpoint(run)
        if resume_from is not None:
            learner.load_state(resume_from)
            state = load_trainer_state(resume_from)
            if lead:
                print(f"dpo: resumed from {resume_from.name} (step {state.step})")
        logger = MetricsLogger(run, tensorboard=cfg.tensorboard, wandb=cfg.wandb) if lead else None
        if logger is not None:
            logger.truncate_after(state.step)

        def errors(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
            return pair_errors(model, bundle.tokenizer, bundle.ids, batch, pairs.image_size, cfg.max_prompt_tokens)

        def loss_fn(model, batch: PairBatch):
            err_w, err_l = errors(model, batch)
            with learner.reference() as ref:
                ref_w, ref_l = errors(ref, batch)
            out = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, cfg.beta, cfg.chosen_fm_weight)
            return out.loss, dpo_metrics(out, "dpo")

        # this rank's held-out pairs; their (t, e) are fixed for the whole run so evaluations compare
        my_eval = list(range(me, len(split.eval), world))
        eval_batches = [
            make_batch(pairs, [split.eval[i] for i in my_eval[s : s + cfg.eval_micro_batch_pairs]],
                       my_eval[s : s + cfg.eval_micro_batch_pairs], cfg.seed, EVAL_STREAM)
            for s in range(0, len(my_eval), cfg.eval_micro_batch_pairs)
        ]  # fmt: skip

        def evaluate() -> dict[str, float]:
            learner.model.eval()
            errs = []
            with torch.no_grad():
                for batch in eval_batches:
                    pol = errors(learner.model, batch)
                    with learner.reference() as ref:
                        errs.append((*pol, *errors(ref, batch)))
            learner.model.train()
            if not errs:  # a rank without held-out pairs still joins the all-reduce, with weight 0
                return learner.mean_over_ranks({f"dpo_eval/{name}": 0.0 for name in METRICS}, weight=0.0)
            out = diffusion_dpo_loss(*(torch.cat([e[k] for e in errs]) for k in range(4)), cfg.beta,
                                     cfg.chosen_fm_weight)  # fmt: skip
            return learner.mean_over_ranks(dpo_metrics(out, "dpo_eval"), weight=float(len(my_eval)))

        # 3. the loop: one optimizer update per step over pairs_per_step pairs of an endless seeded stream
        per_rank = cfg.pairs_per_rank()
        # an attempt skipped for a non-finite loss passes its pairs over and is no step (no metrics row, no
        # evaluation, no checkpoint), until too many in a row stop the job
        progress = tqdm(initial=state.step, total=cfg.steps, desc="dpo", disable=not lead)
        while state.step < cfg.steps:
            start = time.perf_counter()
            position = state.extra["consumed_pairs"]
            order = sample_order(len(split.train), cfg.seed, position, cfg.pairs_per_step)
            mine = range(me * per_rank, (me + 1) * per_rank)  # contiguous slice of this step's pairs
            micro = [
                make_batch(pairs, [split.train[order[i]] for i in mine[s : s + cfg.micro_batch_pairs]],
                           [position + i for i in mine[s : s + cfg.micro_batch_pairs]], cfg.seed, TRAIN_STREAM)
                for s in range(0, per_rank, cfg.micro_batch_pairs)
            ]  # fmt: skip
            torch.manual_seed(cfg.seed * 1_000_003 + state.step * 101 + me)  # LoRA dropout: exact on resume
            updates_before = learner.step_count
            try:
                metrics = learner.step(micro, loss_fn)
            except NonFiniteLossError as e:
                progress.close()  # the error line then starts a line of its own
                if logger is not None:
                    logger.close()
                raise nonfinite_stop(run, e) from None
            state.extra["consumed_pairs"] = position + cfg.pairs_per_step
            if learner.step_count == updates_before:  # skipped (every rank alike): weights and step unchanged
                continue
            state.step = learner.step_count
            state.num_skipped_steps = learner.num_skipped
            metrics["train/pairs_per_s"] = cfg.pairs_per_step / (time.perf_counter() - start)
            if split.eval and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                metrics.update(evaluate())
            if logger is not None:
                logger.log(state.step, metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics.get('dpo/loss', float('nan')):.4f}",
                                 acc=f"{metrics.get('dpo/implicit_accuracy', float('nan')):.2f}")  # fmt: skip
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                step_dir = staging_dir(run, state.step)  # renamed to step_N by finish_checkpoint
                weights = learner.policy_weights(rank0_only=True)  # collective under ZeRO-3
                if lead:
                    save_published(bundle, weights, step_dir / "model", torch.bfloat16 if cfg.learner.bf16 else None)
                learner.save_state(step_dir)  # every rank: its optimizer / ZeRO partition
                learner.barrier()
                if lead:
                    finish_checkpoint(run, step_dir, state, cfg.keep_last)
        progress.close()
        if logger is not None:
            logger.close()
        learner.barrier()
    return run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/dpo/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 beta=500 data.path=runs/prefs")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(DpoConfig, args.config, args.overrides)
    out = run_dpo(cfg)
    if rank() == 0:
        print(f"dpo: done; checkpoints in {out}")
    return 0
