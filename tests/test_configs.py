"""Every YAML under configs/ loads and validates against the schema of its job."""

from pathlib import Path

import pytest

from alignment.jobs.sft import SftConfig
from base_model.schema import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMAS = {"sft": SftConfig}  # configs/<job>/*.yaml -> schema
ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_configs():
    assert ALL


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads(path):
    job = path.relative_to(CONFIGS).parts[0]
    assert job in SCHEMAS, f"no schema registered for configs/{job}/ in tests/test_configs.py"
    load_config(SCHEMAS[job], path)
