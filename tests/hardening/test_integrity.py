"""Integrity of what jobs write (issue 18, items 4-6): one job per directory (an flock held for the job's
life), a non-finite stop that leaves `latest` and its files untouched and metrics without a repeated step,
checkpoints renamed into place only when complete, leftovers of killed writes swept on start, and output
directories that cannot be written refused in one line before anything is written. Every job runs through
`nsalign` (`jobs.cli.main`) on the tiny preset."""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.errors import UserError
from core.files import LOCK, lock_dir
from core.runs import prepare_run_dir
from jobs.cli import main
from tests.hardening.helpers import BadInput, run_bad_input

pytestmark = pytest.mark.deepspeed

REPO = Path(__file__).resolve().parents[2]


# -- inputs ---------------------------------------------------------------------------------------


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sft_config(tmp_path: Path) -> Path:
    """A 3-pair Parquet and an SFT config on it: run `runs/r`, 2 samples per step, a checkpoint every 2 steps."""
    data = tmp_path / "pairs.parquet"
    colors = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rows = {"caption": [f"a {c} square" for c in colors], "image": [_png(v) for v in colors.values()]}
    pq.write_table(pa.table(rows), data)
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"run_name: r\nruns_root: {tmp_path / 'runs'}\nmodel: tiny\ndata: {{path: {data}, image_size: 32}}\n"
                   "steps: 2\nmicro_batch_samples: 2\ncheckpoint_every: 2\nkeep_last: 5\n"
                   "learner: {lr: 1.0e-3, zero_stage: 2}\n")  # fmt: skip
    return config


def dpo_config(tmp_path: Path) -> Path:
    """4 best-vs-worst pairs of the tiny model and a DPO config on them, shaped like sft_config's."""
    from tests.jobs.test_dpo_job import build_jpeg_prefs

    prefs = build_jpeg_prefs(tmp_path / "prefs", num_prompts=4, samples_per_prompt=2)
    config = tmp_path / "dpo.yaml"
    config.write_text(f"run_name: r\nruns_root: {tmp_path / 'runs'}\nmodel: tiny\ndata: {{path: {prefs}}}\nsteps: 2\n"
                   "pairs_per_step: 2\nmicro_batch_pairs: 2\ncheckpoint_every: 2\nkeep_last: 5\n"
                   "learner: {lr: 1.0e-3, zero_stage: 2}\n")  # fmt: skip
    return config


def job_argv(job: str, tmp_path: Path) -> list[str]:
    """`nsalign JOB CONFIG key=value...` for 2 steps of run `runs/r` with a checkpoint every 2 steps; later
    key=value arguments override these."""
    if job == "grpo":  # configs/grpo/tiny.yaml checkpoints every 2 steps
        return ["grpo", str(REPO / "configs/grpo/tiny.yaml"), f"runs_root={tmp_path / 'runs'}", "run_name=r",
                f"prompts={REPO / 'configs/grpo/prompts_tiny.txt'}", "steps=2", "keep_last=5",
                "sampling.image_size=32", "sampling.num_head_steps=2"]  # fmt: skip
    return [job, str({"sft": sft_config, "dpo": dpo_config}[job](tmp_path))]


# -- the lock -------------------------------------------------------------------------------------

HOLDER = """import sys
from contextlib import ExitStack
from core.files import lock_dir
with ExitStack() as held:
    for line in sys.stdin:  # DIRECTORY<TAB>JOB<TAB>LOCK_NAME; held until the test module closes our stdin
        held.enter_context(lock_dir(*line.rstrip("\\n").split("\\t")))
        print("held", flush=True)
"""


@pytest.fixture(scope="module")
def hold():
    """hold(directory, job, lock_name) -> the pid of another process, which now holds that directory's lock
    (one process for the module: it starts in seconds, torch included)."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)  # fmt: skip

    def start(directory: Path, job: str = "sft", lock_name: str = LOCK) -> int:
        child.stdin.write(f"{directory}\t{job}\t{lock_name}\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "held"
        return child.pid

    yield start
    child.stdin.close()
    child.wait(timeout=60)


def test_lock_names_its_holder_is_released_with_its_block_and_nests_across_directories(tmp_path):
    me = os.getpid()
    with lock_dir(tmp_path / "a", "sft") as a:
        assert (a / LOCK).read_text() == f"pid {me} (nsalign sft)\n"
        with lock_dir(a / "eval", "evaluate"):  # another directory, even inside: its own lock
            pass
        refused = pytest.raises(UserError, match=rf"a is in use by pid {me} \(nsalign sft\)")
        with refused, lock_dir(a, "dpo"):  # the same directory twice, even in one process
            pass
    assert (tmp_path / "a" / LOCK).read_text() == ""  # released, and no stale pid to mislead
    with lock_dir(tmp_path / "a", "dpo"):
        pass


def _locked_sft(tmp_path):
    return ["sft", str(sft_config(tmp_path))], tmp_path / "runs" / "r", LOCK


def _locked_build_prefs(tmp_path):
    out = tmp_path / "prefs"
    return ["build-prefs", str(REPO / "configs/prefs/tiny.yaml"), f"out_dir={out}", "prompts.limit=4"], out, LOCK


def _locked_evaluate(tmp_path):
    out = tmp_path / "eval"
    return ["evaluate", str(REPO / "configs/evaluate/tiny.yaml"), f"out_dir={out}", "prompts.limit=2"], out, LOCK


def _locked_select(tmp_path):
    run = tmp_path / "run"  # a finished run as select sees it: config.yaml and one step_*/model
    (run / "step_000001" / "model").mkdir(parents=True)
    (run / "step_000001" / "model" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("model: tiny\n")
    return ["select", str(REPO / "configs/select/tiny.yaml"), f"run_dir={run}"], run, LOCK


def _locked_pipeline(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"out_dir: {tmp_path / 'pipe'}\nstages:\n"
                   f"  - {{name: e, job: evaluate, config: {REPO / 'configs/evaluate/tiny.yaml'}}}\n")  # fmt: skip
    return ["pipeline", str(config)], tmp_path / "pipe", ".pipeline.lock"


@pytest.mark.parametrize(
    "setup", [_locked_sft, _locked_build_prefs, _locked_evaluate, _locked_select, _locked_pipeline],
    ids=["sft", "build-prefs", "evaluate", "select", "pipeline"],
)  # fmt: skip
def test_a_second_job_on_a_locked_directory_stops_naming_the_holder(tmp_path, capsys, hold, setup):
    argv, directory, lock_name = setup(tmp_path)
    pid = hold(directory, "first", lock_name)
    line = run_bad_input(BadInput(argv[0], argv, f"in use by pid {pid} (nsalign first)", [directory]), capsys)
    assert str(directory) in line


# -- non-finite losses ----------------------------------------------------------------------------


def nan_losses(monkeypatch, job: str, bad_calls: set[int] | None) -> None:
    """Make the job's loss NaN on its `bad_calls`-th calls (0-based; None: every call), patched in the job's
    module, where it looks the loss up."""
    module, name = {"sft": ("jobs.sft", "sft_loss"),
                    "dpo": ("jobs.dpo", "diffusion_dpo_loss"),
                    "grpo": ("alignment.grpo_learner", "grpo_objective")}[job]  # fmt: skip
    target = importlib.import_module(module)
    real, calls = getattr(target, name), []

    def patched(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if bad_calls is None or len(calls) - 1 in bad_calls:
            if job == "grpo":
                return out[0] * float("nan"), out[1]
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(target, name, patched)


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def steps_logged(run: Path) -> list[int]:
    return [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("job", ["sft", "dpo", "grpo"])
def test_a_non_finite_stop_leaves_latest_untouched_and_a_skip_is_no_step(tmp_path, capsys, monkeypatch, job):
    """2 clean steps (checkpoint step_000002); the same run continued to 4 steps with every loss NaN stops
    after learner.max_consecutive_nonfinite = 3 attempts, at a checkpoint boundary, without touching it;
    continued again to 3 steps with one NaN attempt, it skips that attempt and trains step 3."""
    base = job_argv(job, tmp_path)
    run = tmp_path / "runs" / "r"
    assert main(base) == 0
    before, names = tree(run / "step_000002"), sorted(p.name for p in run.iterdir())
    assert (run / "latest").read_text() == "step_000002\n" and steps_logged(run) == [1, 2]

    nan_losses(monkeypatch, job, None)
    line = run_bad_input(BadInput(job, [*base, "steps=4"], "3 non-finite losses in a row", []), capsys)
    assert f"last good checkpoint is {run / 'step_000002'}" in line
    assert (run / "latest").read_text() == "step_000002\n"
    assert tree(run / "step_000002") == before  # byte for byte
    assert sorted(p.name for p in run.iterdir()) == names  # no new checkpoint, nothing half-written
    assert steps_logged(run) == [1, 2]  # skipped attempts are no step rows

    monkeypatch.undo()
    nan_losses(monkeypatch, job, {0})  # the first attempt after the resume only
    assert main([*base, "steps=3"]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["train/skipped_nonfinite"] == 1.0  # the skip is counted on the next step's row
    assert (run / "latest").read_text() == "step_000003\n"


# -- checkpoints: renamed into place, leftovers swept -----------------------------------------------


def test_a_killed_checkpoint_write_leaves_no_step_dir_and_the_next_start_sweeps_it(tmp_path, monkeypatch):
    from alignment.learner import Learner

    config = sft_config(tmp_path)
    run = tmp_path / "runs" / "r"
    assert main(["sft", str(config)]) == 0
    before = tree(run / "step_000002")

    def killed(self, directory):  # the model is written; the engine state is not
        raise KeyboardInterrupt

    monkeypatch.setattr(Learner, "save_state", killed)
    assert main(["sft", str(config), "steps=4"]) == 130
    assert (run / "latest").read_text() == "step_000002\n" and tree(run / "step_000002") == before
    assert not (run / "step_000004").exists()  # readers (evaluate, select) never see a half checkpoint
    assert (run / ".step_000004.tmp-staging" / "model" / "config.json").is_file()
    monkeypatch.undo()
    assert main(["sft", str(config), "steps=4"]) == 0
    assert (run / "latest").read_text() == "step_000004\n" and not (run / ".step_000004.tmp-staging").exists()
    assert (run / "step_000004" / "trainer_state.json").is_file()


def test_a_job_start_sweeps_what_killed_writes_left_and_nothing_else(tmp_path):
    run = tmp_path / "r"
    left = [".step_000004.tmp-staging/model", "step_000002/.model.tmp-k3x9_a1b", "step_000002/.ema.old-4242"]
    kept = ["step_000002/model", "notes.tmp", ".cache", "step_000002/model.tmp-1", "select/soup-1-2/.model.tmp-ab"]
    for d in left + kept:
        (run / d).mkdir(parents=True)
    (run / ".latest.tmp-77").write_text("step_000004\n")
    with lock_dir(run, "sft"):
        prepare_run_dir(tmp_path, "r", {"steps": 4})
    assert not (run / ".latest.tmp-77").exists()
    assert [d for d in left if (run / d).exists()] == [] and not (run / ".step_000004.tmp-staging").exists()
    assert [d for d in kept if not (run / d).is_dir()] == []  # select sweeps its soups itself


# -- a bad model path, unusable output directories -------------------------------------------------


def test_a_bad_model_path_leaves_no_run_dir_and_the_corrected_command_runs(tmp_path, capsys):
    config = sft_config(tmp_path)
    bad = BadInput("model", ["sft", str(config), f"model={tmp_path / 'no-model'}"], "checkpoint directory not found",
                   [tmp_path])  # fmt: skip
    run_bad_input(bad, capsys)
    assert not (tmp_path / "runs").exists()
    assert main(["sft", str(config)]) == 0  # not refused as "differs in model"


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a directory\n")
    return tmp_path / "a-file"


UNWRITABLE = [
    ("sft runs_root is a file", lambda t: ["sft", str(sft_config(t)), f"runs_root={_a_file(t)}"]),
    ("sft runs_root on a read-only file system", lambda t: ["sft", str(sft_config(t)), "runs_root=/sys/nsalign-runs"]),
    ("build-prefs out_dir inside a file", lambda t: ["build-prefs", str(REPO / "configs/prefs/tiny.yaml"),
                                                     f"out_dir={_a_file(t) / 'prefs'}", "prompts.limit=4"]),
    ("evaluate out_dir inside a file", lambda t: ["evaluate", str(REPO / "configs/evaluate/tiny.yaml"),
                                                  f"out_dir={_a_file(t) / 'eval'}", "prompts.limit=2"]),
    ("pipeline out_dir is a file", lambda t: ["pipeline", str(_locked_pipeline(t)[0][1]), f"out_dir={_a_file(t)}"]),
]  # fmt: skip


@pytest.mark.parametrize("name,argv", UNWRITABLE, ids=[u[0] for u in UNWRITABLE])
def test_an_unwritable_output_directory_is_one_line_and_leaves_nothing(tmp_path, capsys, name, argv):
    run_bad_input(BadInput(name, argv(tmp_path), "cannot create or write this directory", [tmp_path]), capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_dir_is_one_line(tmp_path, capsys):
    config = sft_config(tmp_path)
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r").chmod(0o555)
    try:
        run_bad_input(BadInput("read-only", ["sft", str(config)], "cannot create or write", [tmp_path]), capsys)
    finally:
        (tmp_path / "runs" / "r").chmod(0o755)


def test_sft_refuses_a_step_that_does_not_split_over_the_ranks(monkeypatch, tmp_path, capsys):
    """Under torchrun (WORLD_SIZE=2) each rank trains whole micro batches of the step: 1 x 4 samples cannot split."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tmp_path / "sft.yaml"
    data = tmp_path / "d.parquet"
    config.write_text(f"run_name: r\nruns_root: {tmp_path / 'runs'}\nmodel: tiny\ndata: {{path: {data}}}\n")
    run_bad_input(BadInput("sft x2", ["sft", str(config)], "not a multiple of micro batch x ranks (4 x 2)", [tmp_path]),
                  capsys)  # fmt: skip
