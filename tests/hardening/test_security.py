"""Issue 18, security: nothing a config or a run directory holds runs code, and a lone job opens no port
reachable from outside.

- a geneval reward names its detector from a registry; a `module:attr` string (`os:system`) is an unknown
  name that `nsalign rewards check --load` refuses before anything is imported or called;
- a resume reads RNG and trainer state from JSON, and DeepSpeed's engine files with weights_only: a crafted
  pickle (engine files, or the legacy rng_state.pt) stops the resume with one line and never runs;
- a Learner in a single process (no launcher) listens on the loopback interface only.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from core.errors import CheckpointError, ConfigError
from tests.hardening.helpers import BadInput, run_bad_input

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


# -- 1. detectors are names, never import paths ---------------------------------------------------------


def _rewards_yaml(tmp_path: Path, detector: str, args: dict | None = None) -> Path:
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [{"class": "square", "count": 1}],
                                "prompt": "a square"}) + "\n")  # fmt: skip
    params = {"metadata": str(meta), "detector": detector, "score": "strict"}
    if args is not None:
        params["detector_args"] = args
    path = tmp_path / "rewards.yaml"
    path.write_text(json.dumps({"rewards": [{"name": "rule", "type": "geneval", "params": params}]}))
    return path


def test_a_config_naming_os_system_as_detector_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "marker"
    config = _rewards_yaml(tmp_path, "os:system", {"command": f"touch {shlex.quote(str(marker))}"})
    line = run_bad_input(
        BadInput("os:system", ["rewards", "check", str(config), "--load"], "unknown detector 'os:system'", [tmp_path]),
        capsys,
    )
    assert "known: shapes" in line and "nextstep_align.geneval_detectors" in line
    assert not marker.exists()


@pytest.mark.parametrize("detector", ["shapes", "shapes.detect:ShapesDetector"])  # the name; a legacy rewards.yaml
def test_the_shapes_detector_still_loads_by_name(tmp_path, capsys, detector):
    from jobs.cli import main

    assert main(["rewards", "check", str(_rewards_yaml(tmp_path, detector, {"min_area": 10})), "--load"]) == 0
    assert "all 1 rewards ready and loadable" in capsys.readouterr().out


def test_plugins_come_from_entry_points_and_cannot_replace_builtins(monkeypatch):
    from importlib.metadata import EntryPoint

    import rewards.geneval as geneval
    from rewards.shapes_detect import ShapesDetector

    group = geneval.DETECTOR_ENTRY_POINTS
    declared = [
        EntryPoint("shapes", "os:system", group),
        EntryPoint("mine", "rewards.shapes_detect:ShapesDetector", group),
    ]

    def entry_points(group: str) -> list[EntryPoint]:
        return [ep for ep in declared if ep.group == group]

    monkeypatch.setattr(geneval.importlib.metadata, "entry_points", entry_points)
    assert geneval.known_detectors() == ["shapes", "mine"]
    assert isinstance(geneval.load_detector("shapes", {}), ShapesDetector)  # the built-in, not os.system
    assert isinstance(geneval.load_detector("mine", {"min_area": 5}), ShapesDetector)
    with pytest.raises(ConfigError, match="unknown detector 'os:system'"):
        geneval.load_detector("os:system", {"command": "true"})
    with pytest.raises(ConfigError, match="detector_args do not fit"):
        geneval.load_detector("shapes", {"command": "true"})


# -- 2. RNG state is JSON; the legacy pickle is refused ---------------------------------------------------


def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist(), torch.randn(2).tolist())  # fmt: skip


def test_rng_round_trips_exactly_through_the_json_checkpoint(tmp_path):
    from core.runs import RNG_STATE, TrainerState, finish_checkpoint, load_trainer_state, prepare_run_dir

    run = prepare_run_dir(tmp_path, "r", {})
    random.gauss(0, 1), np.random.randn()  # leave a cached gaussian in both python and numpy
    step_dir = run / "step_000001"
    step_dir.mkdir()
    finish_checkpoint(run, step_dir, TrainerState(step=1), keep_last=2)
    expected = _draws()
    _draws()
    assert load_trainer_state(step_dir).step == 1
    assert _draws() == expected
    state = json.loads((step_dir / RNG_STATE).read_text())  # plain JSON: ints, floats, hex strings
    assert set(state) == {"format", "python", "numpy", "torch", "cuda"} and isinstance(state["torch"], str)
    state["numpy"]["keys"] = state["numpy"]["keys"][:-1]
    (step_dir / RNG_STATE).write_text(json.dumps(state))
    before = (random.getstate(), torch.get_rng_state())
    with pytest.raises(CheckpointError, match=r"rng_state\.json: not an RNG state \(numpy\.keys"):
        load_trainer_state(step_dir)
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])  # nothing half-set


def test_a_legacy_pickled_rng_state_is_refused_unopened(tmp_path):
    from core.runs import LEGACY_RNG_STATE, RNG_STATE, TrainerState, finish_checkpoint, load_trainer_state

    step_dir = tmp_path / "step_000001"
    step_dir.mkdir()
    finish_checkpoint(tmp_path, step_dir, TrainerState(step=1), keep_last=0)
    (step_dir / RNG_STATE).unlink()
    marker = tmp_path / "marker"
    torch.save({"python": Payload(marker)}, step_dir / LEGACY_RNG_STATE)
    with pytest.raises(CheckpointError, match="old pickle format, which is never loaded") as e:
        load_trainer_state(step_dir)
    assert "\n" not in str(e.value) and not marker.exists()


# -- 3. DeepSpeed engine state is loaded weights-only ------------------------------------------------------


def test_load_weights_only_refuses_crafted_pickles_in_both_formats(tmp_path):
    from alignment.learner_state import load_weights_only

    marker = tmp_path / "marker"
    torch.save({"module": Payload(marker)}, tmp_path / "zip.pt")  # torch's zip format
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"module": Payload(marker)}, protocol=2))  # torch's legacy format
    (tmp_path / "raw4.pt").write_bytes(pickle.dumps({"module": Payload(marker)}, protocol=4))
    for name, message in [("zip.pt", "it holds `posix.system`"), ("raw.pt", "it holds `posix.system`"),
                          ("raw4.pt", "Unsupported operand")]:  # fmt: skip
        with pytest.raises(CheckpointError, match=f"not loaded: {message}") as e:
            load_weights_only(str(tmp_path / name))
        assert "\n" not in str(e.value)
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes((tmp_path / "zip.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable DeepSpeed state"):
        load_weights_only(str(tmp_path / "cut.pt"))


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [0, 1, 3])  # stage 2: tests/alignment/test_learner.py::test_resume_is_exact
def test_weights_only_resume_is_exact(tmp_path, stage):
    """2 steps straight == 1 step, save, a fresh learner loads (weights-only), 1 more step."""
    from tests.alignment.test_learner import _sft_setup

    straight, data, loss_fn = _sft_setup(stage)
    for _ in range(2):
        straight.step(data, loss_fn)
    first, data, loss_fn = _sft_setup(stage)
    first.step(data, loss_fn)
    first.save_state(tmp_path)
    resumed, data, loss_fn = _sft_setup(stage)
    resumed.load_state(tmp_path)
    assert resumed.step_count == 1
    resumed.step(data, loss_fn)
    a, b = straight.policy_weights(), resumed.policy_weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _sft_job(tmp_path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), (255, 0, 0), dtype=np.uint8)).save(buf, format="PNG")
    data = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"caption": ["a red square", "a red thing"], "image": [buf.getvalue()] * 2}), data)
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({
        "run_name": "r", "runs_root": str(tmp_path / "runs"), "model": "tiny", "data": {"path": str(data)},
        "micro_batch_samples": 2, "checkpoint_every": 2, "keep_last": 2, "learner": {"lr": 1e-3, "zero_stage": 2},
    }))  # fmt: skip
    return config


@pytest.mark.deepspeed
def test_a_crafted_pickle_in_a_checkpoint_stops_the_resume_and_runs_nothing(tmp_path, capsys):
    from jobs.cli import main

    config = _sft_job(tmp_path)
    assert main(["sft", str(config), "steps=2"]) == 0
    step = tmp_path / "runs" / "r" / "step_000002"
    engine = step / "engine" / "state"
    marker = tmp_path / "marker"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "../../rng_state.pt"):
        target = engine / name
        saved = target.read_bytes() if target.is_file() else None
        if name.endswith("rng_state.pt"):  # a run of an earlier version: pickled RNG, no rng_state.json
            shutil.move(step / "rng_state.json", tmp_path / "rng_state.json")
        torch.save({"optimizer_state_dict": Payload(marker), "step_count": 0}, target)
        message = "old pickle format" if saved is None else "not loaded: it holds `posix.system`"
        case = BadInput(name, ["sft", str(config), "steps=4"], message, [tmp_path / "runs"])
        run_bad_input(case, capsys)
        assert not marker.exists(), name
        if saved is None:
            target.unlink()
            shutil.move(tmp_path / "rng_state.json", step / "rng_state.json")
        else:
            target.write_bytes(saved)
    assert main(["sft", str(config), "steps=3"]) == 0  # the untouched checkpoint resumes through the same path
    assert (tmp_path / "runs" / "r" / "latest").read_text().strip() == "step_000003"


# -- 4. a lone Learner listens on loopback only -------------------------------------------------------------


def _address(hex_addr: str) -> str:
    """/proc/net/tcp{,6} local address (host byte order words, hex) -> printable IP."""
    raw = bytes.fromhex(hex_addr)
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, packed)


def listening_sockets(pid: str = "self") -> list[tuple[str, int]]:
    """(ip, port) of every listening TCP socket process `pid` holds, from /proc (Linux)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.is_file():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state 0A: LISTEN
                ip, port = fields[1].split(":")
                found.append((_address(ip), int(port, 16)))
    return found


def exposed(sockets: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Those not bound to a loopback address (0.0.0.0 and :: included: every interface)."""
    return [(ip, port) for ip, port in sockets if not (ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1"))]


pytestmark_linux = pytest.mark.skipif(not Path("/proc/self/net/tcp").is_file(), reason="reads /proc (Linux)")


@pytestmark_linux
def test_the_socket_check_sees_a_listener_on_every_interface():
    with socket.socket() as wide, socket.socket(socket.AF_INET6) as wide6, socket.socket() as local:
        wide.bind(("0.0.0.0", 0))
        wide6.bind(("::", 0))
        local.bind(("127.0.0.1", 0))
        for s in (wide, wide6, local):
            s.listen()
        mine = listening_sockets()
        assert ("0.0.0.0", wide.getsockname()[1]) in mine and ("::", wide6.getsockname()[1]) in mine
        assert ("127.0.0.1", local.getsockname()[1]) in mine
        assert sorted(exposed(mine)) == sorted([("0.0.0.0", wide.getsockname()[1]), ("::", wide6.getsockname()[1])])


LONE_LEARNER = """
import json, sys, torch
from alignment.learner import Learner, LearnerConfig
from base_model.checkpoint import build_random
from tests.hardening.test_security import listening_sockets
learner = Learner(build_random("tiny", seed=0).model.train(), LearnerConfig(zero_stage=int(sys.argv[1])))
store = torch.distributed.distributed_c10d._get_default_store()
print(json.dumps({"sockets": listening_sockets(), "store": type(store).__name__,
                  "backend": torch.distributed.get_backend(), "world": learner.world_size}))
"""


@pytestmark_linux
@pytest.mark.deepspeed
def test_a_lone_learner_listens_on_loopback_only():
    """In a fresh process without launcher variables (as `nsalign sft` runs): no TCPStore, and whatever the
    backend listens on is loopback. Before the fix torch's TCPStore for MASTER_PORT listened on `*:PORT`."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    for stage in ("0", "3"):  # ZeRO-3 builds more process groups
        done = subprocess.run([sys.executable, "-c", LONE_LEARNER, stage], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["world"] == 1 and report["store"] != "TCPStore", report
        assert not exposed([tuple(s) for s in report["sockets"]]), report


def test_a_lone_process_claiming_more_ranks_is_told_to_use_a_launcher(monkeypatch):
    from alignment import learner

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 RANK=0 without MASTER_ADDR/MASTER_PORT: start .* torchrun"):
        learner.init_distributed()


def test_a_reward_checkpoint_that_is_a_crafted_pickle_is_refused_in_one_line(tmp_path):
    """Reward weights (aesthetic MLP, HPSv2, ...) go through read_torch_file: weights_only, and torch's
    many-line refusal is cut to its first line."""
    from rewards.common import read_torch_file

    marker = tmp_path / "marker"
    path = tmp_path / "mlp.pth"
    torch.save({"weight": Payload(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        read_torch_file(path, "the aesthetic MLP")
    assert "\n" not in str(e.value) and str(path) in str(e.value) and not marker.exists()


def test_the_cli_prints_a_many_line_message_as_one_line():
    from jobs.cli import one_line

    message = "bad file\n  column 'x': int64\n\nexpected string\n"
    assert one_line(message) == "bad file; column 'x': int64; expected string"
