"""Resuming on another number of ranks with learner.reshard_on_resume=universal: DeepSpeed's universal
checkpoint carries the Adam state over, so 2 steps on N ranks + 1 step on M ranks equals 3 uninterrupted
steps on N ranks (2 -> 1 and 1 -> 2; ZeRO-2, ZeRO-3, ZeRO-3 with LoRA; gloo); and the refusals, one line
each, that leave nothing behind.

Tolerance: the global batch of a step is the same 2 micro batches on 1 or 2 ranks, and its gradient differs
only by the order of float sums (DeepSpeed's average over ranks vs our accumulation), as in
tests/jobs/test_distributed_sft.py: rtol 1e-5, atol 1e-6 against an update of ~1e-3 per step (lr 1e-3).
A fresh optimizer would miss by about a step's size: Adam's first update is lr * sign(gradient)."""

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from alignment.learner import Learner
from alignment.learner_config import LearnerConfig, LoraConfig
from alignment.learner_state import UNIVERSAL
from base_model.checkpoint import build_random
from base_model.sequence import build_prompt_batch
from base_model.teacher_forcing import sft_loss
from core.errors import CheckpointError, ConfigError
from core.schema import from_dict
from tests.distributed_helpers import torchrun

pytestmark = pytest.mark.deepspeed

MICRO_BATCHES = 2  # per step, over all ranks


def tiny_learner(stage: int, seed: int = 0, lora: bool = False, **config) -> tuple[Learner, object]:
    """A tiny model's learner (lr 1e-3; rank-2 LoRA adapters if `lora`) and its bundle (tokenizer and special
    ids, whatever the seed)."""
    bundle = build_random("tiny", seed=seed)
    if lora:
        config["lora"] = LoraConfig(rank=2)
    learner = Learner(bundle.model.train(), LearnerConfig(lr=1e-3, zero_stage=stage, **config))
    return learner, bundle


def train(learner: Learner, bundle, steps: range) -> None:
    """Step s takes micro batches 2s and 2s+1 (noise and flow times seeded by that index); each rank an equal
    contiguous share, so 1 and 2 ranks see one global batch."""
    per_rank = MICRO_BATCHES // learner.world_size
    for step in steps:
        ids = [MICRO_BATCHES * step + i for i in range(MICRO_BATCHES)][learner.rank * per_rank :][:per_rank]
        batch = [(build_prompt_batch(bundle.tokenizer, bundle.ids, [f"caption {i}"], (64, 64), False),
                  torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(i)), i) for i in ids]  # fmt: skip

        def loss_fn(model, mb):
            return sft_loss(model, mb[0], bundle.ids, mb[1], generator=torch.Generator().manual_seed(mb[2])).loss, {}

        assert learner.step(batch, loss_fn).updated


def adam_state(learner: Learner) -> dict[str, float]:
    """This rank's share of the Adam state: the steps it counts (one value) and the summed |exp_avg|, |exp_avg_sq|
    (padding is zero, so the sums over the ranks do not depend on how many there are)."""
    states = list(learner.engine.optimizer.optimizer.state.values())
    steps = {float(s["step"]) for s in states}
    assert len(steps) == 1, steps
    return {"step": steps.pop(), "exp_avg": sum(float(s["exp_avg"].abs().sum()) for s in states),
            "exp_avg_sq": sum(float(s["exp_avg_sq"].abs().sum()) for s in states)}  # fmt: skip


def run_and_resume(stage: str, lora: str, out: str, resume_from: str) -> None:
    """Worker: 2 steps, checkpoint (out/saved), 1 more step; then another learner resumes `resume_from` (saved
    by another number of ranks) and takes that third step. Rank 0 writes both weights; each rank its Adam
    state at the save and after the resume."""
    learner, bundle = tiny_learner(int(stage), lora=lora == "lora")
    train(learner, bundle, range(2))
    learner.save_state(Path(out, "saved"))
    saved = adam_state(learner)
    train(learner, bundle, range(2, 3))
    full = learner.policy_weights(rank0_only=True)
    resumed, report = resume_and_step(int(stage), lora == "lora", Path(resume_from))
    if learner.rank == 0:
        torch.save({"full": full, "resumed": resumed}, Path(out, "weights.pt"))
    Path(out, f"rank{learner.rank}.json").write_text(json.dumps({"saved": saved, **report}))


def resume_and_step(stage: int, lora: bool, directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A fresh learner resumes `directory` universally and takes step 3: its weights, and its Adam state and
    step counter right after loading. Its model has another seed, so the weights must come from the
    checkpoint; with LoRA only the adapters do (the frozen base is the job's `model`, as on every resume)."""
    learner, bundle = tiny_learner(stage, seed=0 if lora else 7, lora=lora, reshard_on_resume="universal")
    learner.load_state(directory)
    report = {"loaded": adam_state(learner), "step_count": learner.step_count}
    train(learner, bundle, range(2, 3))
    return learner.policy_weights(rank0_only=True), report


@pytest.fixture(scope="module", params=[(2, False), (3, False), (3, True)], ids=["zero2", "zero3", "zero3-lora"])
def runs(request, tmp_path_factory):
    """The same 3-step run on 1 rank (in this process) and on 2 (torchrun), each checkpointed after step 2;
    the 2-rank launch also resumes the 1-rank checkpoint. Returns (stage, lora, tmp dir, the 1-rank run's
    final weights and its Adam state at the checkpoint)."""
    (stage, lora), tmp = request.param, tmp_path_factory.mktemp(f"zero{request.param[0]}")
    one = tmp / "one"
    learner, bundle = tiny_learner(stage, lora=lora)
    train(learner, bundle, range(2))
    learner.save_state(one / "saved")
    saved_one = adam_state(learner)
    train(learner, bundle, range(2, 3))
    full_one = learner.policy_weights()
    (tmp / "two").mkdir()
    torchrun("tests.alignment.test_universal_resume", "run_and_resume", 2, str(stage), "lora" if lora else "full",
             str(tmp / "two"), str(one / "saved"))  # fmt: skip
    return stage, lora, tmp, full_one, saved_one


def summed(reports: list[dict], key: str) -> dict[str, float]:
    return {k: sum(r[key][k] for r in reports) if k != "step" else reports[0][key][k] for k in reports[0][key]}


@pytest.mark.slow
def test_two_ranks_resumed_on_one_keep_the_optimizer_and_equal_the_uninterrupted_run(runs):
    stage, lora, tmp, _, _ = runs
    saved = summed([json.loads((tmp / "two" / f"rank{r}.json").read_text()) for r in (0, 1)], "saved")
    weights, report = resume_and_step(stage, lora, tmp / "two" / "saved")
    assert report["step_count"] == 2 and report["loaded"]["step"] == 2.0  # Adam's bias correction continues
    assert report["loaded"]["exp_avg"] > 0 and report["loaded"] == pytest.approx(saved, rel=1e-6)
    assert (tmp / "two" / "saved" / "engine" / UNIVERSAL / "state" / "zero").is_dir()
    full = torch.load(tmp / "two" / "weights.pt", weights_only=True)["full"]
    for k in full:
        torch.testing.assert_close(weights[k], full[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_rank_resumed_on_two_keeps_the_optimizer_and_equals_the_uninterrupted_run(runs):
    _, _, tmp, full_one, saved_one = runs
    reports = [json.loads((tmp / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["step_count"] == 2 and r["loaded"]["step"] == 2.0 for r in reports)
    assert all(r["loaded"]["exp_avg"] > 0 for r in reports)  # each rank holds its half of the moments
    assert summed(reports, "loaded") == pytest.approx(saved_one, rel=1e-6)
    resumed = torch.load(tmp / "two" / "weights.pt", weights_only=True)["resumed"]
    for k in full_one:
        torch.testing.assert_close(resumed[k], full_one[k], rtol=1e-5, atol=1e-6)


# -- refusals: one line each, nothing written -------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_by_two(tmp_path_factory):
    """A ZeRO-3 checkpoint of 1 step whose world record says 2 ranks wrote it (what a refusal reads first)."""
    directory = tmp_path_factory.mktemp("two") / "step_000001"
    learner, bundle = tiny_learner(3)
    train(learner, bundle, range(1))
    learner.save_state(directory)
    record = directory / "engine" / "world.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "world_size": 2}))
    return directory


def refused(directory: Path, stage: int = 3, **config) -> str:
    learner, _ = tiny_learner(stage, **config)
    before = sorted(p.name for p in (directory / "engine").iterdir())
    with pytest.raises(CheckpointError) as caught:
        learner.load_state(directory)
    assert sorted(p.name for p in (directory / "engine").iterdir()) == before  # no universal/, no temporary
    assert len(str(caught.value).splitlines()) == 1
    return str(caught.value)


def test_by_default_another_number_of_ranks_stops_with_one_line_naming_both_ways_on(saved_by_two):
    line = refused(saved_by_two)
    assert "saved by 2 ranks (ZeRO-3), this job runs 1 (ZeRO-3)" in line
    assert "learner.reshard_on_resume=universal" in line and "learner.reshard_on_resume=true" in line


def test_universal_refuses_zero0_state_and_another_zero_stage(saved_by_two, tmp_path):
    line = refused(saved_by_two, stage=2, reshard_on_resume="universal")
    assert "universal: the checkpoint is ZeRO-3 and this job ZeRO-2; use the same stage. Resume on 2 ranks, or " \
           "set learner.reshard_on_resume=weights" in line  # fmt: skip
    zero0 = _copy(saved_by_two, tmp_path)
    record = zero0 / "engine" / "world.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "zero_stage": 0}))
    assert "ZeRO-0 state has no partitions for DeepSpeed to convert" in refused(zero0, reshard_on_resume="universal")


def _copy(directory: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(directory, tmp_path / directory.name))


def test_a_conversion_that_fails_is_one_line_and_leaves_nothing(saved_by_two, tmp_path):
    """DeepSpeed's converter calls torch.load(weights_only=False); here it runs weights-only: an optimizer file
    holding a crafted pickle stops the conversion before anything runs, and its temporary directory goes."""
    directory = _copy(saved_by_two, tmp_path)
    optim = next((directory / "engine" / "state").glob("*optim_states.pt"))
    marker = tmp_path / "ran"
    optim.write_bytes(pickle.dumps(Exploit(marker), protocol=2))
    line = refused(directory, reshard_on_resume="universal")
    assert "optim_states.pt: not loaded: it holds `posix.system`" in line and not marker.exists(), line


class Exploit:
    """Unpickled, it would run `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_reshard_on_resume_takes_false_true_weights_or_universal():
    modes = {v: from_dict(LearnerConfig, {"reshard_on_resume": v}).reshard_mode
             for v in (False, True, "weights", "universal")}  # fmt: skip
    assert modes == {False: "off", True: "weights", "weights": "weights", "universal": "universal"}
    with pytest.raises(ConfigError, match="learner.reshard_on_resume: must be false, true, weights or universal, "
                                          "got 'universl'"):  # fmt: skip
        LearnerConfig(reshard_on_resume="universl").validate()


WORKERS = {"run_and_resume": run_and_resume}

if __name__ == "__main__":
    WORKERS[sys.argv[1]](*sys.argv[2:])
