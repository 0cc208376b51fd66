"""`nsalign sft` data-parallel: 2 ranks under torchrun (gloo, ZeRO-3, the model read from a checkpoint
directory under zero.Init) against the same global batch on 1 process, then resumed on 1 rank; plain SFT and
Self-CoT SFT (half of the samples with their reasoning)."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from base_model.checkpoint import build_random, load_checkpoint, save_checkpoint
from core.rng import sample_order
from core.schema import load_config
from jobs.cli import main
from jobs.sft import SftConfig, SftTrainer, run_sft
from tests.distributed_helpers import torchrun
from tests.jobs.test_sft_job import COLORS, _png

pytestmark = pytest.mark.deepspeed

SAMPLES = 6  # a step of 4 takes a different share of each epoch


@pytest.fixture(params=["plain", "cot"])
def setup(tmp_path, request):
    """A Parquet of 6 pairs (+ a reasoning column), a tiny checkpoint directory, and the config of a 2-step
    ZeRO-3 run (cot: half of the samples in the Self-CoT layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    colors = [*COLORS.values(), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    data = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"caption": [f"square {i}" for i in range(SAMPLES)],
                             "image": [_png(c) for c in colors],
                             "plan": [f"1 shape: square {i}" for i in range(SAMPLES)]}), data)  # fmt: skip
    model = save_checkpoint(build_random("tiny", seed=5), tmp_path / "start")
    config = {"run_name": "two", "runs_root": str(tmp_path / "runs"), "model": str(model), "data": {"path": str(data)},
              "steps": 2, "micro_batch_samples": 1, "micro_batches_per_step": 4, "checkpoint_every": 2,
              "caption_dropout": 0.25, "learner": {"lr": 1e-3, "zero_stage": 3}}  # fmt: skip
    if request.param == "cot":
        config["data"]["reasoning_field"] = "plan"
        config.update(cot_fraction=0.5, lm_loss_weight=1.0, cot={"template": "{caption}. plan: "})
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_ranks_train_disjoint_shares_equal_one_process_and_resume_on_one(tmp_path, setup, capsys):
    torchrun("tests.jobs.test_distributed_sft", "sft", 2, str(setup), str(tmp_path))
    run = tmp_path / "runs" / "two"
    used = [json.loads((tmp_path / f"used{r}.json").read_text()) for r in (0, 1)]
    order = sample_order(SAMPLES, seed=0, position=0, count=8)  # 2 steps x 4 samples
    assert used[0] == order[0:2] + order[4:6] and used[1] == order[2:4] + order[6:8]  # contiguous halves
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # written once per step (rank 0), not once per rank
    assert len(list((run / "step_000002" / "engine" / "state").glob("*optim_states.pt"))) == 2
    assert json.loads((run / "step_000002" / "engine" / "world.json").read_text())["world_size"] == 2

    one = run_sft(load_config(SftConfig, str(setup), ["run_name=one"]))  # 1 process, same global batch
    a = load_checkpoint(run / "step_000002" / "model").model.state_dict()
    b = load_checkpoint(one / "step_000002" / "model").model.state_dict()
    start = build_random("tiny", seed=5).model.state_dict()
    assert any(not torch.equal(b[k], start[k]) for k in b)
    # equal up to the order of float sums (gradients averaged over ranks vs accumulated); Adam divides a tiny
    # gradient by its own size, so the Self-CoT run's 100x text weight shows that noise on a few entries at ~1%
    # of a step (lr 1e-3)
    atol = 1e-5 if "cot_fraction" in setup.read_text() else 1e-6
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol)
    first = [json.loads(r) for r in (one / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/loss", "sft/reasoning_nll"):  # the reasoning's NLL: weighted by its tokens over ranks
        assert [r.get(key) for r in rows] == pytest.approx([r.get(key) for r in first], rel=1e-5, nan_ok=True)

    # resumed on 1 rank (one launch serves both checks: the CPU is shared): one line, or resharded on request
    capsys.readouterr()
    assert main(["sft", str(setup), "steps=3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "saved by 2 ranks (ZeRO-3), this job runs 1" in err[0], err
    assert "learner.reshard_on_resume=true" in err[0]
    assert main(["sft", str(setup), "steps=3", "learner.reshard_on_resume=true"]) == 0
    assert "resharded step_000002: saved by 2 ranks, resumed on 1" in capsys.readouterr().out
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    record = json.loads((run / "step_000003" / "engine" / "world.json").read_text())
    assert record == {"world_size": 1, "zero_stage": 3, "step_count": 3, "num_skipped": 0}


def sft(config: str, out: str) -> None:
    """Worker: the SFT job, recording the sample indices this rank trained on."""
    used: list[int] = []
    loss_fn = SftTrainer.loss_fn

    def recording(self, model, items):
        used.extend(i for i, *_ in items)
        return loss_fn(self, model, items)

    SftTrainer.loss_fn = recording
    run_sft(load_config(SftConfig, config, []))
    rank = torch.distributed.get_rank()
    Path(out, f"used{rank}.json").write_text(json.dumps(used))


WORKERS = {"sft": sft}

if __name__ == "__main__":
    WORKERS[sys.argv[1]](*sys.argv[2:])
