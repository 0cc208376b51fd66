"""`nsalign build-prefs` end to end on the tiny model: Ray workers, exactly-once resume, a killed worker."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.schema import load_config
from jobs.build_prefs import BuildPrefsConfig, run_build_prefs
from jobs.cli import main
from rewards.jpeg import JpegReward
from rollout.batch import sample_seed
from rollout.prefs_format import decode_png, read_pairs, shard_paths
from rollout.prompts import prompt_id

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "prefs" / "tiny.yaml"
PROMPTS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "star")]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """In-process workers set torch's thread count (rollout.num_threads=1); give the suite its 2 back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _overrides(tmp_path: Path, out: str, pool: str = "local", num_workers: int = 1) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    if not prompts.is_file():
        prompts.write_text("\n".join(PROMPTS) + "\n")
    return [
        f"out_dir={tmp_path / out}", f"prompts.path={prompts}", "prompts.limit=null", "samples_per_prompt=4",
        "prompts_per_shard=1", "sampling.num_head_steps=4", "pairs.top_k=1", f"rollout.pool.kind={pool}",
        f"rollout.pool.num_workers={num_workers}", "rollout.pool.num_cpus_per_worker=0.5",
        "rollout.num_threads=1",  # bit-identical floats in-process and in Ray actors
    ]  # fmt: skip


def _table(out: Path) -> pa.Table:
    table = pa.concat_tables([pq.read_table(p) for p in shard_paths(out)])
    return table.sort_by([("prompt_id", "ascending"), ("pair_index", "ascending")])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pa.Table:
    """An uninterrupted in-process build: what every other way of building must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    run_build_prefs(load_config(BuildPrefsConfig, CONFIG, _overrides(tmp, "ref")))
    torch.set_num_threads(threads)  # module-scoped: the autouse fixture does not cover it
    return _table(tmp / "ref")


def test_rows_carry_pairs_scores_and_provenance(reference, tmp_path):
    rows = reference.to_pylist()
    assert sorted(r["prompt_id"] for r in rows) == sorted(prompt_id(p) for p in PROMPTS)  # one pair per prompt
    jpeg = JpegReward(direction="compressibility", quality=95)
    for r in rows:
        assert r["chosen_reward"] > r["rejected_reward"]  # top_k=1: the best sample against a lower one
        assert r["chosen_sample_index"] != r["rejected_sample_index"]
        assert r["chosen_seed"] == sample_seed(r["prompt_id"], r["chosen_sample_index"], 0)
        assert np.asarray(r["chosen_tokens"]).shape == (16, 64)  # 64x64 image = 4x4 tokens
        images = [decode_png(r["chosen_image"]), decode_png(r["rejected_image"])]
        assert images[0].shape == (3, 64, 64)
        # the PNG is lossless, so re-scoring the stored image gives the stored score
        rescored = jpeg(torch.stack(images), [r["prompt"]] * 2).scores
        np.testing.assert_allclose(rescored.numpy(), [r["chosen_reward"], r["rejected_reward"]], rtol=1e-6)
        assert r["chosen_scores"]["jpeg"] == pytest.approx(r["chosen_reward"])
        assert r["checkpoint"] == "tiny" and r["strategy"] == "nextstep" and '"image_size": 64' in r["sampling"]


def test_hugging_face_datasets_reads_the_shards(reference, tmp_path):
    import datasets

    out = tmp_path / "ds"
    run_build_prefs(load_config(BuildPrefsConfig, CONFIG, _overrides(tmp_path, "ds") + ["prompts.limit=3"]))
    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    assert len(ds) == 3 and {"chosen_image", "rejected_tokens", "chosen_scores"} <= set(ds.column_names)
    assert len(read_pairs(out)) == 3


@pytest.mark.ray
def test_two_ray_workers_give_the_same_dataset(reference, tmp_path, ray_session):
    run_build_prefs(load_config(BuildPrefsConfig, CONFIG, _overrides(tmp_path, "ray", "ray", 2)))
    assert _table(tmp_path / "ray").equals(reference)


def test_interrupted_then_resumed_equals_uninterrupted(reference, tmp_path):
    """SIGKILL the job after its first shards land, rerun the same command: same dataset, each prompt once."""
    cmd = [sys.executable, "-m", "jobs.cli", "build-prefs", str(CONFIG), *_overrides(tmp_path, "crash")]
    data = tmp_path / "crash" / "data"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(data.glob("shard-*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done_before = len(list(data.glob("shard-*.parquet")))
    assert 3 <= done_before < len(PROMPTS), "the kill must land mid-run"
    assert main(["build-prefs", str(CONFIG), *_overrides(tmp_path, "crash")]) == 0
    assert _table(tmp_path / "crash").equals(reference)
    assert not list(data.glob(".*tmp*"))


def _descends_from_us(pid: int) -> bool:
    """Whether `pid`'s ancestry reaches this process: a worker of the local Ray this test started (its raylet
    is our child), not one of another Ray on the same machine."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised command name
    return False


def _rollout_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ray::RolloutWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return [pid for pid in pids if _descends_from_us(pid)]


@pytest.mark.ray
def test_a_killed_ray_worker_loses_and_duplicates_nothing(reference, tmp_path, ray_session, capsys):
    data = tmp_path / "kill" / "data"
    killed: list[int] = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not list(data.glob("shard-*.parquet")):
            time.sleep(0.02)
        pids = _rollout_worker_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    thread = threading.Thread(target=killer)
    thread.start()
    run_build_prefs(load_config(BuildPrefsConfig, CONFIG, _overrides(tmp_path, "kill", "ray", 2)))
    thread.join()
    assert killed, "no rollout worker process was found to kill"
    assert "replaced it" in capsys.readouterr().out
    assert _table(tmp_path / "kill").equals(reference)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["prompts.path=EMPTY"], "no prompts"),
        (["pairs.primary=hps"], "pairs.primary"),
        (["pairs.top_k=4"], "top_k"),
        (["model=/nonexistent/ckpt"], "/nonexistent/ckpt"),
        (["samples_per_prompt=two"], "samples_per_prompt"),
        (["colour=red"], "unknown key 'colour'"),
        (["sampling.image_size=60"], "image_size"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("")
    extra = [e.replace("EMPTY", str(tmp_path / "empty.txt")) for e in extra]
    assert main(["build-prefs", str(CONFIG), *_overrides(tmp_path, "bad"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nsalign build-prefs: error:") and message in err[0]
    assert not (tmp_path / "bad").exists()
