"""The shape every training job shares (torchtune's recipe): setup -> open_run -> train -> cleanup.

    trainer.run():
      setup()      inputs, model, learner (and pools): everything checked before the run directory exists,
                   so a bad path leaves nothing a corrected command would be refused against
      open_run()   lock runs/<name>, write or check config.yaml, resume from `latest` (learner state,
                   TrainerState, RNG), open the metrics; then `opened(resumed_from)` for the job's own state
      train()      step() until `steps`; each counted step is logged, and saved every `checkpoint_every`
      cleanup()    close the metrics (and the job's pools), always

`step()` is the job: one attempt at a training step, returning its metrics, or None when every update it
tried was skipped for a non-finite loss (then it is no step: no metrics row, no checkpoint; its data is
passed over). `max_consecutive_nonfinite` skips in a row end the job with one line naming the last good
checkpoint. Under torchrun (SFT, DPO) rank 0 alone locks, logs and writes the published model and `latest`;
every rank writes its DeepSpeed state.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from alignment.learner import Learner, NonFiniteLossError
from alignment.learner_config import LearnerConfig
from base_model.checkpoint import NextStepBundle, save_published
from core.files import lock_dir
from core.runs import (
    MetricsLogger,
    TrainerState,
    finish_checkpoint,
    latest_checkpoint,
    load_trainer_state,
    nonfinite_stop,
    prepare_run_dir,
    staging_dir,
)
from core.schema import to_dict


class RunConfig(Protocol):
    """The keys every trainer's config has (SftConfig, DpoConfig, GrpoConfig)."""

    run_name: str
    runs_root: str
    steps: int
    checkpoint_every: int
    keep_last: int
    tensorboard: bool
    wandb: bool
    learner: LearnerConfig


class Trainer:
    """Owns the run directory, resume, metrics, checkpoints and non-finite stops; a job fills in `setup`,
    `step` and, where it keeps more state, `opened` / `save_extra` / `cleanup`."""

    job = "train"  # the command's name: lock holder, log prefix, progress label

    def __init__(self, config: RunConfig, lead: bool = True):
        """lead: whether this process writes the run (rank 0; every process without a launcher)."""
        self.config, self.lead = config, lead
        self.run_dir = Path(config.runs_root) / config.run_name
        self.state = TrainerState()
        self.logger: MetricsLogger | None = None
        self.learner: Learner  # built by setup()
        self.bundle: NextStepBundle  # built by setup()

    # -- what a job provides ------------------------------------------------------------------------

    def setup(self) -> None:
        """Read and check the inputs, build the model and the learner (nothing written yet)."""
        raise NotImplementedError

    def describe(self) -> str | None:
        """The derived sizes, printed (by the lead) once the run directory is open; None: nothing."""
        return None

    def opened(self, resumed_from: Path | None) -> None:
        """After the resume and the metrics: restore the job's own state (EMA, reward normalisers...)."""

    def step(self) -> dict[str, float] | None:
        """One attempt at a step: its metrics, or None when it was skipped for a non-finite loss."""
        raise NotImplementedError

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {"loss": f"{metrics.get('train/loss', float('nan')):.4f}"}

    def save_extra(self, step_dir: Path) -> None:
        """Extra files of a checkpoint, written by the lead next to the model (e.g. the EMA weights)."""

    # -- the shared skeleton ------------------------------------------------------------------------

    def run(self) -> Path:
        """The whole job; returns the run directory."""
        try:
            self.setup()
            with lock_dir(self.run_dir, self.job) if self.lead else nullcontext():  # held for the job's life
                self.open_run()
                self.train()
        finally:
            self.cleanup()
        return self.run_dir

    def open_run(self) -> None:
        if self.lead:
            self.run_dir = prepare_run_dir(self.config.runs_root, self.config.run_name, to_dict(self.config),
                                           defaults=to_dict(type(self.config)()))  # fmt: skip
            if (text := self.describe()) is not None:
                print(text)
        resume_from = latest_checkpoint(self.run_dir)
        if resume_from is not None:
            self.learner.load_state(resume_from)
            self.state = load_trainer_state(resume_from)
            if self.lead:
                print(f"{self.job}: resumed from {resume_from.name} (step {self.state.step})")
        if self.lead:
            self.logger = MetricsLogger(self.run_dir, tensorboard=self.config.tensorboard, wandb=self.config.wandb)
            self.logger.truncate_after(self.state.step)
        self.opened(resume_from)

    def train(self) -> None:
        config, state = self.config, self.state
        progress = tqdm(initial=state.step, total=config.steps, desc=self.job, disable=not self.lead)
        try:
            while state.step < config.steps:
                try:
                    metrics = self.step()
                except NonFiniteLossError as e:
                    progress.close()  # the error line then starts a line of its own
                    raise nonfinite_stop(self.run_dir, e) from None
                if metrics is None:  # skipped: weights and step unchanged
                    continue
                state.step += 1
                state.num_skipped_steps = self.learner.num_skipped
                if self.logger is not None:
                    self.logger.log(state.step, metrics)
                progress.update(1)
                progress.set_postfix(self.postfix(metrics))
                if state.step % config.checkpoint_every == 0 or state.step == config.steps:
                    self.save()
        finally:
            progress.close()
        self.learner.barrier()

    def save(self) -> None:
        """Checkpoint step_<state.step>: staged, then renamed into place, then `latest` moves (lead)."""
        step_dir = staging_dir(self.run_dir, self.state.step)  # renamed to step_N by finish_checkpoint
        weights = self.learner.policy_weights(rank0_only=True)  # collective under ZeRO-3
        if self.lead:
            save_published(self.bundle, weights, step_dir / "model", self.checkpoint_dtype)
            self.save_extra(step_dir)
        self.learner.save_state(step_dir)  # every rank: its optimizer / ZeRO partition
        self.learner.barrier()
        if self.lead:
            finish_checkpoint(self.run_dir, step_dir, self.state, self.config.keep_last)

    @property
    def checkpoint_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.config.learner.bf16 else None

    def cleanup(self) -> None:
        if self.logger is not None:  # None when the run directory was refused before open_run
            self.logger.close()
            self.logger = None
