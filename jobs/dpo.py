"""`nsalign dpo CONFIG [key=value ...]`: Diffusion-DPO of NextStep-1 on a build-prefs dataset.

Diffusion-DPO (Wallace et al., arXiv 2311.12908) moved to the flow head (docs/algorithms.md §8): per pair
(c, y_w, y_l), one teacher-forced pass gives every image token's condition h_j, and the per-image flow
error l(y) = mean_j ||head(x_t^j, t_j, h_j) - (y_j - e_j)||^2 / 64 uses the SAME (t_j, e_j) for winner
and loser, policy and reference. L = -log sigmoid(-(beta/2) [(l(y_w) - l_ref(y_w)) - (l(y_l) - l_ref(y_l))]).
Gradients reach the head and, through h_j, the backbone. The reference is the frozen starting model
(a second copy), or the policy with its LoRA adapters disabled when `learner.lora` is set.

Self-CoT pairs (build-prefs with sampling.self_cot, docs/algorithms.md §8.1): each image is conditioned on the
reasoning t it was drawn after (the caption in the pairs' CoT template, then t, then the image block).
`text_loss: true` adds the standard DPO margin of the reasoning, text_beta [(log pi(t_w) - log pi_ref(t_w))
- (log pi(t_l) - log pi_ref(t_l))], to z inside the same sigmoid: DPO on the joint likelihood of text then
image; only then does a gradient reach lm_head.

Departures from the paper: each image token draws its own t_j ~ logit-normal and e_j (NextStep's
training distribution), not one t per image; (t, e) of a pair come from a generator seeded by
(seed, position in the pair stream), so a resumed run and any world size see the same noise.
Under torchrun each rank takes a contiguous slice of every step's pairs; rank 0 alone writes the
published model, metrics and `latest`; every rank writes its DeepSpeed state.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.learner import Learner
from alignment.learner_config import LearnerConfig
from alignment.losses import DpoOutput, diffusion_dpo_loss
from alignment.model_source import open_model
from alignment.objectives import (
    EVAL_STREAM,
    TRAIN_STREAM,
    PairBatch,
    PairScores,
    dpo_metric_names,
    dpo_metrics,
    make_batch,
    pair_scores,
)
from alignment.ranks import check_divisible, rank, rank_share, world_size
from alignment.trainer import Trainer
from base_model.model import NextStepModel
from base_model.sequence import DEFAULT_MAX_PROMPT_TOKENS, check_sequence_fits, grid_for_size, truncation_note
from core.errors import ConfigError, UserError
from core.rng import sample_order
from core.schema import load_config
from rollout.prefs_format import PreferencePairs, read_pairs


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
    beta: float = 2500.0  # scale of the error difference; depends on how the error is averaged (docs/algorithms.md §8)
    chosen_fm_weight: float = 0.0  # lambda of an extra flow-matching loss on the winners (RPO-style; 0 = off)
    # Self-CoT pairs: also DPO on the reasoning text, its margin added inside the sigmoid (docs/algorithms.md §8.1)
    text_loss: bool = False
    text_beta: float = 0.1  # beta of the text term (standard DPO's default)
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
        if not self.text_beta > 0:
            raise ConfigError(f"{where}.text_beta: must be > 0, got {self.text_beta}")
        if self.max_prompt_tokens < 1:  # the fit to the model is checked once the dataset's image size is known
            raise ConfigError(f"{where}.max_prompt_tokens: must be >= 1, got {self.max_prompt_tokens}")
        for name in ("steps", "pairs_per_step", "micro_batch_pairs", "eval_every", "eval_micro_batch_pairs",
                     "checkpoint_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        check_divisible(f"{where}.pairs_per_step", self.pairs_per_step, self.micro_batch_pairs, world_size(), "pairs")
        self.learner.validate(f"{where}.learner")

    def pairs_per_rank(self) -> int:
        return self.pairs_per_step // world_size()


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


def check_pairs_fit(pairs: PreferencePairs, token_dim: int, where: str) -> None:
    """Token shapes of the dataset against the model's token_dim: [N, (S/16)^2, token_dim]."""
    _, num_tokens, dim = pairs.chosen_tokens.shape
    h, w = grid_for_size(pairs.image_size, pairs.image_size)
    if num_tokens != h * w or dim != token_dim:
        raise UserError(
            f"{where}: tokens of shape [{num_tokens}, {dim}] do not fit the model "
            f"({h * w} tokens of {token_dim} dims at {pairs.image_size}px)"
        )


def self_cot_text_tokens(pairs: PreferencePairs, where: str) -> int:
    """Positions the pairs' CoT template and reasoning add to a sequence (0 for image-only pairs): the
    sampler's bound (`CotConfig.text_tokens`) for the template and max_text_tokens they were written with."""
    if not pairs.self_cot:
        return 0
    longest = max(len(t) for t in pairs.chosen_text_ids + pairs.rejected_text_ids)
    if longest > pairs.cot.max_text_tokens:
        raise UserError(f"{where}: a reasoning of {longest} tokens is longer than the dataset's "
                        f"cot.max_text_tokens={pairs.cot.max_text_tokens}")  # fmt: skip
    return pairs.cot.text_tokens


def concat_scores(parts: list[PairScores]) -> PairScores:
    """PairScores of several batches -> one (the text fields stay None when the batches have none)."""

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return PairScores(cat("err_w"), cat("err_l"), cat("text_w"), cat("text_l"))


class DpoTrainer(Trainer):
    """Diffusion-DPO in the trainer shape: one optimizer update per step over `pairs_per_step` pairs of an
    endless seeded stream, each rank a contiguous slice; held-out evaluation every `eval_every` steps."""

    job = "dpo"

    def __init__(self, config: DpoConfig):
        super().__init__(config, lead=rank() == 0)
        self.config: DpoConfig = config
        self.me, self.world = rank(), world_size()

    def setup(self) -> None:
        config = self.config
        self.pairs = read_pairs(config.data.path)
        if config.text_loss and not self.pairs.self_cot:
            raise UserError(f"text_loss: true needs Self-CoT pairs, but {config.data.path} holds image-only pairs "
                            "(build it with sampling.self_cot: true, or set text_loss=false)")  # fmt: skip
        self.split = split_by_prompt(self.pairs.prompts, config.data.eval_fraction)
        source = open_model(config.model, seed=config.seed)  # weights read parameter by parameter below
        check_pairs_fit(self.pairs, source.config.token_dim, config.data.path)
        check_sequence_fits(config.max_prompt_tokens, (self.pairs.image_size,) * 2,
                            source.config.max_position_embeddings, f"{config.data.path}: max_prompt_tokens",
                            text_tokens=self_cot_text_tokens(self.pairs, config.data.path))  # fmt: skip
        torch.manual_seed(config.seed)
        # a rendezvous of all ranks; under ZeRO-3 policy and reference are built partitioned (zero.Init)
        self.learner = Learner.from_source(source.build, source.read, config.learner, reference=True,
                                           where=source.where)  # fmt: skip
        self.bundle = source.bundle(self.learner.model)
        # this rank's held-out pairs; their (t, e) are fixed for the whole run so evaluations compare
        self.my_eval = list(range(self.me, len(self.split.eval), self.world))
        per = config.eval_micro_batch_pairs
        self.eval_batches = [
            make_batch(self.pairs, [self.split.eval[i] for i in self.my_eval[s : s + per]], self.my_eval[s : s + per],
                       config.seed, EVAL_STREAM)
            for s in range(0, len(self.my_eval), per)
        ]  # fmt: skip

    def describe(self) -> str:
        config, split, pairs = self.config, self.split, self.pairs
        per_rank = config.pairs_per_rank()
        text = (f"dpo: {len(split.train)} train pairs ({split.num_train_prompts} prompts), {len(split.eval)} "
                f"held-out pairs ({split.num_eval_prompts} prompts); {pairs.chosen_tokens.shape[1]} tokens/image at "
                f"{pairs.image_size}px; {config.pairs_per_step} pairs/step = {self.world} ranks x "
                f"{per_rank // config.micro_batch_pairs} micro batches x {config.micro_batch_pairs} pairs; "
                f"{config.steps} "
                f"steps (~{config.steps * config.pairs_per_step / len(split.train):.1f} epochs); beta {config.beta}; "
                f"{self.text_note()}"
                f"{'LoRA' if config.learner.lora else 'full'} fine-tuning -> {self.run_dir}")  # fmt: skip
        unique = sorted(set(pairs.prompts))
        note = truncation_note("dpo", "max_prompt_tokens", self.bundle.tokenizer, unique, config.max_prompt_tokens)
        return f"{text}\n{note}" if note else text

    def text_note(self) -> str:
        if not self.pairs.self_cot:
            return ""
        term = f"text DPO term on (text_beta {self.config.text_beta})" if self.config.text_loss else "text term off"
        return f"Self-CoT pairs ({term}); "

    def step(self) -> dict[str, float] | None:
        config, state = self.config, self.state
        start = time.perf_counter()
        position, per_rank = state.consumed_pairs, config.pairs_per_rank()
        order = sample_order(len(self.split.train), config.seed, position, config.pairs_per_step)
        mine = rank_share(config.pairs_per_step, self.me, self.world)  # contiguous slice of this step's pairs
        micro = [
            make_batch(self.pairs, [self.split.train[order[i]] for i in mine[s : s + config.micro_batch_pairs]],
                       [position + i for i in mine[s : s + config.micro_batch_pairs]], config.seed, TRAIN_STREAM)
            for s in range(0, per_rank, config.micro_batch_pairs)
        ]  # fmt: skip
        torch.manual_seed(config.seed * 1_000_003 + state.step * 101 + self.me)  # LoRA dropout: exact on resume
        result = self.learner.step(micro, self.loss_fn)
        state.consumed_pairs = position + config.pairs_per_step  # a skipped attempt passes its pairs over
        if not result.updated:  # every rank alike
            return None
        metrics = result.metrics
        metrics["train/pairs_per_s"] = config.pairs_per_step / (time.perf_counter() - start)
        done = state.step + 1
        if self.split.eval and (done % config.eval_every == 0 or done == config.steps):
            metrics.update(self.evaluate())
        return metrics

    def scores(self, model: NextStepModel, batch: PairBatch) -> PairScores:
        """l(y_w), l(y_l) [N] of `model` (and log pi(t_w), log pi(t_l) [N] with text_loss)."""
        return pair_scores(model, self.bundle.tokenizer, self.bundle.ids, batch, self.pairs.image_size,
                           self.config.max_prompt_tokens, score_text=self.config.text_loss)  # fmt: skip

    def dpo_loss(self, pol: PairScores, ref: PairScores) -> DpoOutput:
        config = self.config
        return diffusion_dpo_loss(pol.err_w, pol.err_l, ref.err_w, ref.err_l, config.beta, config.chosen_fm_weight,
                                  pol.text_w, pol.text_l, ref.text_w, ref.text_l, config.text_beta)  # fmt: skip

    def loss_fn(self, model: NextStepModel, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        pol = self.scores(model, batch)
        with self.learner.reference() as ref_model:  # no_grad: its errors and text log-probs alike
            ref = self.scores(ref_model, batch)
        out = self.dpo_loss(pol, ref)
        return out.loss, dpo_metrics(out, "dpo")

    def evaluate(self) -> dict[str, float]:
        """`dpo_eval/*` over the held-out pairs, averaged over the ranks by their number of pairs."""
        learner = self.learner
        learner.model.eval()
        pols, refs = [], []
        with torch.no_grad():
            for batch in self.eval_batches:
                pols.append(self.scores(learner.model, batch))
                with learner.reference() as ref:
                    refs.append(self.scores(ref, batch))
        learner.model.train()
        if not pols:  # a rank without held-out pairs still joins the all-reduce, with weight 0
            names = dpo_metric_names(self.config.text_loss)
            return learner.mean_over_ranks({f"dpo_eval/{name}": 0.0 for name in names}, weight=0.0)
        out = self.dpo_loss(concat_scores(pols), concat_scores(refs))
        return learner.mean_over_ranks(dpo_metrics(out, "dpo_eval"), weight=float(len(self.my_eval)))

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics.get('dpo/loss', float('nan')):.4f}",
                "acc": f"{metrics.get('dpo/implicit_accuracy', float('nan')):.2f}"}  # fmt: skip


def run_dpo(config: DpoConfig) -> Path:
    """The DPO job (every rank runs it). Returns the run directory."""
    return DpoTrainer(config).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/dpo/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 beta=500 data.path=runs/prefs")


def run(args: argparse.Namespace) -> int:
    config = load_config(DpoConfig, args.config, args.overrides)
    out = run_dpo(config)
    if rank() == 0:
        print(f"dpo: done; checkpoints in {out}")
    return 0
