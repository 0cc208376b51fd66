"""Issue 18, dashboard and Ray part: a busy --serve port, a corrupt model shard handed to Ray jobs, and
a local Ray cluster that must not outlive its driver (signals, SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from base_model.checkpoint import INDEX_NAME, shard_header, tensor_entry_problem, verify_shards
from core import pools, ray_session
from core.errors import CheckpointError
from core.ray_reaper import is_running, session_pids
from tests.dashboard.handmade import eval_dir
from tests.hardening.helpers import BadInput, run_bad_input

ROOT = Path(__file__).resolve().parents[2]

# -- dashboard --serve on a busy port ------------------------------------------------------------------


def test_serve_on_a_busy_port_fails_before_writing(tmp_path, capsys):
    results = eval_dir(tmp_path / "eval", ["a red circle"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["dashboard", str(results), "--out", str(tmp_path / "dash"), "--serve", "--port", str(port)]
        line = run_bad_input(BadInput("busy port", argv, f"127.0.0.1:{port} (already in use)", [tmp_path]), capsys)
    assert line == f"nsalign dashboard: error: --port {port}: cannot serve on 127.0.0.1:{port} (already in use)"
    assert not (tmp_path / "dash").exists()


def test_port_out_of_range_is_one_line(tmp_path, capsys):
    argv = ["dashboard", str(eval_dir(tmp_path / "eval", ["a"])), "--out", str(tmp_path / "d"), "--serve",
            "--port", "70000"]  # fmt: skip
    run_bad_input(BadInput("port 70000", argv, "--port 70000: cannot serve on 127.0.0.1:70000", [tmp_path]), capsys)


# -- safetensors headers, by hand ----------------------------------------------------------------------


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file byte by byte: u64 little-endian header length, JSON header, data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_entry_problems_by_hand():
    ok = {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]}  # 2 * 3 * 4 bytes
    assert tensor_entry_problem(ok) is None
    short = {**ok, "data_offsets": [8, 28]}
    assert tensor_entry_problem(short) == "F32 [2, 3] needs 24 bytes, its data_offsets span 20"
    assert tensor_entry_problem({**ok, "dtype": "BF16", "data_offsets": [0, 12]}) is None  # 6 * 2 bytes
    assert tensor_entry_problem({**ok, "shape": [2, -3]}) == "shape [2, -3]"
    assert tensor_entry_problem({**ok, "data_offsets": [32, 8]}) == "data_offsets [32, 8] end before they begin"
    assert tensor_entry_problem({**ok, "data_offsets": [True, 24]}) == "data_offsets [True, 24]"
    assert tensor_entry_problem({"shape": [1], "data_offsets": [0, 4]}) == "dtype None"
    assert tensor_entry_problem([1]) == "entry is not an object"


def test_shard_header_reads_a_real_file_and_its_length(tmp_path):
    import torch

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(5, dtype=torch.bfloat16)}, str(path))
    header = shard_header(path)
    assert header["a"]["shape"] == [2, 3] and header["b"]["dtype"] == "BF16"
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + n + 24 + 10  # F32 [2, 3] + BF16 [5]
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match=f"truncated safetensors shard \\({8 + n + 33} bytes, its header "
                                              f"describes {8 + n + 34}\\)"):  # fmt: skip
        shard_header(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(CheckpointError, match="1 bytes after the tensor data"):
        shard_header(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="5 bytes cannot hold its header"):
        shard_header(path)


def test_shard_header_rejects_gaps_and_garbage(tmp_path):
    gap = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
           "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}}  # fmt: skip
    with pytest.raises(CheckpointError, match="tensor b: data starts at byte 8, the previous tensor ends at 4"):
        shard_header(_write_raw(tmp_path / "gap.safetensors", gap, bytes(12)))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(CheckpointError, match=f"{bad}: corrupt safetensors shard \\(header is not JSON"):
        shard_header(bad)
    meta = {"__metadata__": {"format": "pt"}, "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    assert list(shard_header(_write_raw(tmp_path / "ok.safetensors", meta, b"xy"))) == ["a"]


def test_verify_shards_checks_the_index(tmp_path):
    entry = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}
    _write_raw(tmp_path / "s1.safetensors", {"a": entry}, b"xy")
    index = tmp_path / INDEX_NAME
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    assert verify_shards(tmp_path) == [tmp_path / "s1.safetensors"]
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 's2.safetensors'}: shard listed in .* is missing"):
        verify_shards(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "c": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match="1 keys listed in model.safetensors.index.json are absent, e.g. c"):
        verify_shards(tmp_path)
    index.write_text("{")
    with pytest.raises(CheckpointError, match="unreadable index"):
        verify_shards(tmp_path)


# -- a corrupt shard given to jobs that start Ray workers -----------------------------------------------


@pytest.fixture(scope="module")
def truncated_model(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir, its truncated shard): the tiny preset saved in 200 kB shards, shard 2 cut short."""
    from base_model.checkpoint import build_random, save_checkpoint

    model = save_checkpoint(build_random("tiny"), tmp_path_factory.mktemp("corrupt") / "model", max_shard_bytes=200_000)
    shard = sorted(model.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    return model, shard


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a job tries to start (or join) Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pools, "ensure_ray", refuse)


def _job_case(job: str, model: Path, shard: Path, tmp: Path) -> BadInput:
    """`nsalign JOB` on the corrupt checkpoint, its rollout workers on Ray."""
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    ray_pool = "{kind: ray, num_workers: 1, num_cpus_per_worker: 0.5}"
    message = f"{shard}: truncated safetensors shard"
    if job == "build-prefs":
        argv = [str(ROOT / "configs/prefs/tiny.yaml"), f"model={model}", f"out_dir={tmp / 'prefs'}",
                f"prompts.path={prompts}"]  # fmt: skip
    elif job == "evaluate":
        argv = [str(ROOT / "configs/evaluate/tiny.yaml"), f"checkpoints=[{model}]", f"out_dir={tmp / 'eval'}",
                f"prompts.path={prompts}", f"rollout.pool={ray_pool}"]  # fmt: skip
    elif job == "select":  # a run whose one saved step is the corrupt checkpoint
        shutil.copytree(model, tmp / "run" / "step_000001" / "model")
        message = f"{tmp / 'run' / 'step_000001' / 'model' / shard.name}: truncated safetensors shard"
        argv = [str(ROOT / "configs/select/tiny.yaml"), f"run_dir={tmp / 'run'}", "base_model=tiny",
                f"eval.prompts.path={prompts}", f"eval.rollout.pool={ray_pool}"]  # fmt: skip
    else:
        argv = [str(ROOT / "configs/grpo/tiny.yaml"), f"model={model}", f"prompts={prompts}",
                f"runs_root={tmp / 'runs'}", f"rollout.pool={ray_pool}"]  # fmt: skip
    # select watches what it writes into the run (select/, selection.*), not the run's own lock file
    watch = [tmp / "run" / "select", tmp / "run" / "step_000001"] if job == "select" else [tmp]
    return BadInput(job, [job, *argv], message, watch)


@pytest.mark.parametrize("job", ["build-prefs", "evaluate", "select", "grpo"])
def test_corrupt_shard_stops_the_job_before_ray(job, truncated_model, tmp_path, capsys, no_ray):
    model, shard = truncated_model
    line = run_bad_input(_job_case(job, model, shard, tmp_path), capsys)
    assert line.startswith(f"nsalign {job}: error: ")
    if job == "select":
        assert not list((tmp_path / "run").glob("selection*")) and not (tmp_path / "run" / "select").exists()


# -- a local Ray does not outlive its driver -------------------------------------------------------------


def test_session_pids_match_only_ray_processes_of_the_session(tmp_path):
    """A hand-made /proc: which processes belong to session S (by command line or an open file in S)."""
    session, ray_dir = "/tmp/ray/session_1_42", "/py/site-packages/ray"

    def proc(pid: int, argv: list[str], files: tuple[str, ...] = ()) -> None:
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        for fd, target in enumerate(files):
            os.symlink(target, tmp_path / str(pid) / "fd" / str(fd))

    proc(10, [f"{ray_dir}/core/src/ray/raylet/raylet", f"--session_dir={session}"])  # names it
    proc(11, ["ray::DashboardAgent"], (f"{session}/logs/dashboard_agent.log",))  # holds a log open
    proc(12, ["ray::IDLE"], ("/dev/null",))  # another session's idle worker
    proc(13, ["tail", "-f", f"{session}/logs/raylet.out"], (f"{session}/logs/raylet.out",))  # not Ray's
    proc(14, [f"{ray_dir}/core/src/ray/gcs/gcs_server", f"--session_dir={session}0"])  # session_1_420
    proc(15, ["ray::RuntimeEnvAgent"], (f"{session}/logs/runtime_env_agent.log",))
    (tmp_path / "self").mkdir()  # not a pid
    assert session_pids(session, ray_dir, proc=str(tmp_path)) == [10, 11, 15]
    assert session_pids(session, ray_dir, proc=str(tmp_path), exclude=11) == [10, 15]


def test_signal_handler_shuts_down_then_hands_the_signal_on(monkeypatch):
    """Without starting Ray: the handler calls ray.shutdown once, restores the earlier handlers, and the
    signal then does what it did before (here: a recording handler, then KeyboardInterrupt)."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(ray_session, "_restore", {})
    monkeypatch.setattr(ray_session, "_ray_owner", [0])
    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGINT)}
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as before any pool (an earlier test's may be live)
        signal.signal(signal.SIGHUP, lambda signum, frame: calls.append(f"previous {signum}"))
        previous = ray_session._signal_handlers()
        assert previous[signal.SIGINT] is signal.default_int_handler
        ray_session._shut_down_on_signals(previous)
        assert signal.getsignal(signal.SIGHUP) is ray_session._stop_signal
        signal.raise_signal(signal.SIGHUP)
        assert calls == ["shutdown", f"previous {int(signal.SIGHUP)}"]
        assert signal.getsignal(signal.SIGHUP) is previous[signal.SIGHUP]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # every handler put back
        ray_session._shut_down_on_signals(previous)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert calls[2:] == ["shutdown"]
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_leaves_the_parents_ray_alone(monkeypatch):
    """A forked child (a data-loader worker) inherits the handler; its SIGHUP must not stop our Ray."""
    import ray

    monkeypatch.setattr(ray, "shutdown", lambda: os._exit(3))  # exit code 3: the child shut Ray down
    monkeypatch.setattr(ray_session, "_restore", {})
    monkeypatch.setattr(ray_session, "_ray_owner", [0])
    saved = signal.signal(signal.SIGHUP, lambda signum, frame: None)
    try:
        ray_session._shut_down_on_signals(ray_session._signal_handlers())
        child = os.fork()
        if child == 0:
            signal.raise_signal(signal.SIGHUP)
            os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    finally:
        signal.signal(signal.SIGHUP, saved)


def test_ignored_signals_stay_ignored():
    saved = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        assert signal.SIGHUP not in ray_session._signal_handlers()
    finally:
        signal.signal(signal.SIGHUP, saved)


DRIVER = """
import os, sys, time
from core.pools import ensure_ray
import ray
ensure_ray(num_cpus=1)
@ray.remote(num_cpus=1)
class Sleeper:
    def pid(self):
        return os.getpid()
    def sleep(self):
        time.sleep(600)
s = Sleeper.remote()
ray.get(s.pid.remote())
print("ready", flush=True)
ray.get(s.sleep.remote())
"""


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below `root`, from /proc (independent of the code under test)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(pid)
    return found


@pytest.mark.ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_local_ray_dies_with_its_driver(sig):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert driver.stdout.readline().strip() == "ready"
        procs = _descendants(driver.pid)
        names = " ".join(procs.values())
        assert "gcs_server" in names and "raylet" in names and "ray::Sleeper" in names
        assert "ray::RuntimeEnvAgent" in names  # started by the raylet: what a killed driver used to leave behind
        driver.send_signal(sig)
        assert driver.wait(timeout=30) == -sig  # ended by the signal itself, after the cleanup
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(is_running(p) for p in procs):
            time.sleep(0.2)
        left = {p: c[:80] for p, c in procs.items() if is_running(p)}
        assert left == {}, f"left running after {sig.name}: {left}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in [p for p in locals().get("procs", {}) if is_running(p)]:  # never leave a cluster behind
            os.kill(pid, signal.SIGKILL)
