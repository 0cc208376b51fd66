"""`nsalign evaluate` with and without Self-CoT: one checkpoint listed twice (`plain=tiny`, `cot=tiny`,
`self_cot: [cot]`) is sampled on the same prompts and seeds, only the Self-CoT rows carry reasoning, eval.json
records the modes, and an entry's mode or the CoT settings cannot change under an existing directory."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from core.errors import ConfigError, UserError
from core.schema import load_config
from dashboard.build import build_data
from dashboard.page import json_for_script, render
from jobs.cli import main
from jobs.evaluate import EvaluateConfig, resolve_checkpoints, run_evaluate
from rollout.batch import sample_seed
from rollout.prompts import load_prompts
from tests.jobs.test_select_job import make_tiny_run

TINY = Path(__file__).resolve().parents[2] / "configs" / "evaluate" / "tiny.yaml"
PROMPTS = ["a red circle", "a blue square"]
BOTH = ["checkpoints=[plain=tiny, cot=tiny]", "self_cot=[cot]"]


def _config(prompts: Path, out: Path, *overrides: str) -> EvaluateConfig:
    common = [f"out_dir={out}", f"prompts.path={prompts}", "sampling.cot.max_text_tokens=4", "rollout.num_threads=1"]
    return load_config(EvaluateConfig, TINY, [*common, *overrides])


def _rows(out: Path, name: str) -> list[dict]:
    rows = [r for f in sorted((out / "scores" / name).glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: (r["prompt_id"], r["sample_index"]))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """One prompt file for every test: a rerun of a directory must name the same one (its config)."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def both(tmp_path_factory, prompts) -> tuple[Path, EvaluateConfig]:
    config = _config(prompts, tmp_path_factory.mktemp("cot_eval") / "eval", *BOTH)
    return run_evaluate(config), config


def test_only_the_self_cot_entry_carries_reasoning_on_the_same_seeds(both):
    out, config = both
    plain, cot = _rows(out, "plain"), _rows(out, "cot")
    assert len(plain) == len(cot) == len(PROMPTS) * config.samples_per_prompt  # 2 prompts x 2 seeds
    assert [r["reasoning"] for r in plain] == [None] * 4
    assert all(isinstance(r["reasoning"], str) for r in cot)
    keys = [(r["prompt_id"], r["sample_index"], r["seed"]) for r in plain]
    assert keys == [(r["prompt_id"], r["sample_index"], r["seed"]) for r in cot]
    expected = sorted((p.id, k, sample_seed(p.id, k, 1234)) for p in load_prompts(config.prompts.path) for k in (0, 1))
    assert keys == expected  # rollout.batch.sample_seed of (prompt id, index, seed 1234), whatever the mode


def test_the_manifest_records_the_modes_and_cot_settings(both):
    out, _ = both
    manifest = json.loads((out / "eval.json").read_text())
    assert manifest["checkpoints"] == {"plain": "tiny", "cot": "tiny"} and manifest["self_cot"] == ["cot"]
    assert manifest["cot"]["max_text_tokens"] == 4 and manifest["cot"]["template"].count("{caption}") == 1


def test_the_dashboard_shows_the_reasoning_and_the_pair(both):
    out, _ = both
    data = build_data([out], num_resamples=100)
    section = data["evals"][0]
    assert section["self_cot"] == ["cot"] and [(p["with"], p["without"]) for p in section["cot_pairs"]] == [
        ("cot", "plain")
    ]
    first = {r["prompt_id"]: r["reasoning"] for r in _rows(out, "cot") if r["sample_index"] == 0}
    assert [row["reasoning"] for row in section["grid"]] == [[None, first[row["prompt_id"]]] for row in section["grid"]]
    page = render(data)
    for text in first.values():  # as the script-safe JSON string the page's program reads back
        assert json_for_script(text) in page


def test_rerun_scores_nothing_and_a_changed_mode_is_refused(both, prompts, tmp_path, capsys):
    out = shutil.copytree(both[0], tmp_path / "eval")
    shards = sorted(out.rglob("*.parquet"))
    before = [p.stat().st_mtime_ns for p in shards]
    run_evaluate(_config(prompts, out, *BOTH))
    assert "(2 of 2 already scored)" in capsys.readouterr().out
    config_yaml = (out / "config.yaml").read_text()
    with pytest.raises(UserError, match="checkpoint 'cot' was evaluated with Self-CoT, not without"):
        run_evaluate(_config(prompts, out, "checkpoints=[plain=tiny, cot=tiny]"))
    with pytest.raises(UserError, match="checkpoint 'plain' was evaluated without Self-CoT, not with"):
        run_evaluate(_config(prompts, out, "checkpoints=[plain=tiny]", "sampling.self_cot=true"))
    with pytest.raises(UserError, match="other sampling.cot settings"):
        run_evaluate(_config(prompts, out, *BOTH, "sampling.cot.max_text_tokens=5"))
    assert [p.stat().st_mtime_ns for p in shards] == before and (out / "config.yaml").read_text() == config_yaml


def test_a_directory_from_before_self_cot_takes_a_self_cot_entry(both, prompts, tmp_path, capsys):
    """Old layout: config.yaml without sampling.self_cot / cot, eval.json without self_cot, shards without
    `reasoning`. Adding the Self-CoT entry scores it alone, with the same reasoning as in a fresh directory."""
    out = shutil.copytree(both[0], tmp_path / "eval")
    shutil.rmtree(out / "scores" / "cot")
    shard = out / "scores" / "plain" / "shard-000000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["reasoning"]), shard)
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["sampling"]["self_cot"], config["sampling"]["cot"]
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    manifest = json.loads((out / "eval.json").read_text())
    del manifest["self_cot"], manifest["cot"], manifest["checkpoints"]["cot"], manifest["sampling"]["cot"]
    (out / "eval.json").write_text(json.dumps(manifest))
    run_evaluate(_config(prompts, out, *BOTH))
    assert "(1 of 2 already scored)" in capsys.readouterr().out
    assert [r["reasoning"] for r in _rows(out, "cot")] == [r["reasoning"] for r in _rows(both[0], "cot")]
    assert json.loads((out / "eval.json").read_text())["self_cot"] == ["cot"]
    assert build_data([out], num_resamples=50)["evals"][0]["cot_pairs"][0]["without"] == "plain"


def test_bad_self_cot_names_are_refused_in_one_line(prompts, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"tiny.yaml.self_cot: 'cto' is not a checkpoint entry \(plain, cot\)"):
        _config(prompts, tmp_path / "e", "checkpoints=[plain=tiny, cot=tiny]", "self_cot=[cto]")
    with pytest.raises(ConfigError, match="tiny.yaml.self_cot: sampling.self_cot is true"):
        _config(prompts, tmp_path / "e", *BOTH, "sampling.self_cot=true")
    rc = main(["evaluate", str(TINY), f"out_dir={tmp_path / 'e'}", "checkpoints=[tiny]", "self_cot=[cot]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "self_cot: 'cot' is not a checkpoint entry (tiny)" in err[0]
    assert not (tmp_path / "e").exists()


def test_a_run_dirs_step_names_are_checked_once_the_run_is_read(prompts, tmp_path):
    run = make_tiny_run(tmp_path / "run", steps=(1,))
    config = _config(prompts, tmp_path / "e", "checkpoints=[]", f"run_dir={run}", "self_cot=[step_000002]")
    with pytest.raises(ConfigError, match=r"'step_000002' is not a checkpoint entry \(step_000001\)"):
        resolve_checkpoints(config)
    ok = _config(prompts, tmp_path / "e", "checkpoints=[]", f"run_dir={run}", "self_cot=[step_000001]")
    assert [n for n, _ in resolve_checkpoints(ok)] == ["step_000001"]


def test_the_sequence_fit_counts_reasoning_only_for_self_cot_entries(prompts, tmp_path):
    # tiny: 4096 positions; 512 prompt tokens + 4000 reasoning tokens cannot fit, 512 alone can
    long = ["sampling.cot.max_text_tokens=4000"]
    assert _config(prompts, tmp_path / "e", "checkpoints=[plain=tiny, cot=tiny]", *long).self_cot == []
    with pytest.raises(ConfigError, match="sampling.max_prompt_tokens: 512 prompt tokens .* reasoning"):
        _config(prompts, tmp_path / "e", *BOTH, *long)
