"""Every YAML under configs/ loads and validates against the schema of its job."""

import importlib
from pathlib import Path

import pytest

from base_model.schema import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMAS = {  # configs/<dir>/*.yaml -> "module:Schema"
    "sft": "alignment.jobs.sft:SftConfig",
    "rewards": "rewards.base:RewardsConfig",
    "prefs": "rollout.build_prefs:BuildPrefsConfig",
    "dpo": "alignment.jobs.dpo:DpoConfig",
    "grpo": "alignment.jobs.grpo:GrpoConfig",
    "evaluate": "alignment.jobs.evaluate:EvaluateConfig",
    "select": "alignment.jobs.select:SelectConfig",
    "shapes": "alignment.jobs.sft:SftConfig",
    "shapes_world": "shapes.build_world:WorldConfig",
}
ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_configs():
    assert ALL


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads(path):
    job = path.relative_to(CONFIGS).parts[0]
    assert job in SCHEMAS, f"no schema registered for configs/{job}/ in tests/test_configs.py"
    module, name = SCHEMAS[job].split(":")
    load_config(getattr(importlib.import_module(module), name), path)
