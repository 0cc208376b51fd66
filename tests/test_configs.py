"""Every YAML under configs/ loads and validates against the schema of its job."""

import importlib
from pathlib import Path

import pytest

from core.schema import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMAS = {  # configs/<dir>/*.yaml -> "module:Schema"
    "sft": "jobs.sft:SftConfig",
    "rewards": "rewards.base:RewardsConfig",
    "prefs": "jobs.build_prefs:BuildPrefsConfig",
    "dpo": "jobs.dpo:DpoConfig",
    "grpo": "jobs.grpo:GrpoConfig",
    "evaluate": "jobs.evaluate:EvaluateConfig",
    "select": "jobs.select:SelectConfig",
    "shapes": "jobs.sft:SftConfig",
    "shapes_world": "jobs.shapes_world:WorldConfig",
}
PIPELINES = {"quickstart", "e2e", "e2e_cot"}  # configs/<dir>/pipeline.yaml + the stage configs it names
ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_configs():
    assert ALL


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads(path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # configs name each other relative to the repository root
    job = path.relative_to(CONFIGS).parts[0]
    if job in PIPELINES:  # validated through the pipeline that runs it, with that stage's overrides
        from jobs.pipeline import PipelineConfig, check_stage_configs

        pipeline = load_config(PipelineConfig, path.parent / "pipeline.yaml")
        check_stage_configs(pipeline)
        used = {(CONFIGS.parent / s.config).resolve() for s in pipeline.stages} | {(path.parent / "pipeline.yaml")}
        assert path.resolve() in used, f"{path.name} is not a stage of {path.parent / 'pipeline.yaml'}"
        return
    assert job in SCHEMAS, f"no schema registered for configs/{job}/ in tests/test_configs.py"
    module, name = SCHEMAS[job].split(":")
    load_config(getattr(importlib.import_module(module), name), path)


def test_exponent_without_a_dot_is_a_number_and_words_are_not(tmp_path):
    # YAML 1.1 reads `1e-5` as the string "1e-5"; a float field takes it as 1e-5, in a file or an override.
    from dataclasses import dataclass

    from core.errors import ConfigError

    @dataclass
    class Cfg:
        lr: float = 1.0

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\n")
    assert load_config(Cfg, path).lr == 1e-5
    assert load_config(Cfg, path, ["lr=-2E3"]).lr == -2000.0
    assert load_config(Cfg, path, ["lr=.5"]).lr == 0.5
    for bad in ("high", "1e", "e5", "1e-5x", "nan"):
        with pytest.raises(ConfigError, match="lr: expected a number"):
            load_config(Cfg, path, [f"lr={bad}"])
