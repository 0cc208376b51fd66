"""The package cut, checked from the source: every import (function-local ones too) points down the layers,
no job imports another job, and no file grows past 400 lines.

    core  <-  base_model  <-  shapes  <-  rewards  <-  rollout  <-  alignment  <-  jobs
                                                                     dashboard  <-  jobs

`core` is shared plumbing (errors, config schema, run directories, tables, pools); `base_model` is
NextStep-1 itself; `shapes` is the synthetic world (scenes, data splits, its VAE); `rewards` score images
(the shapes world's rule detector and shaped reward among them, built on its scenes); `rollout` samples
and scores; `alignment` changes weights; `jobs` holds one module per `nsalign` command.
The dashboard reads result files only, so it imports no other package but `core.formats` (the file names,
which imports nothing; the rest of `core` imports torch).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the packages its modules may import (besides itself)
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "base_model": {"core"},
    "shapes": {"core", "base_model"},
    "rewards": {"core", "base_model", "shapes"},
    "rollout": {"core", "base_model", "shapes", "rewards"},
    "alignment": {"core", "base_model", "rewards", "rollout", "shapes"},
    "dashboard": set(),
    "jobs": {"core", "base_model", "rewards", "rollout", "shapes", "alignment", "dashboard"},
}
# The jobs package's entry point and registry: it lists the jobs (imported by name on use), and the
# pipeline reads that table to check its stages' configs. Not a job itself.
JOBS_REGISTRY = "jobs.cli"
# single modules a package may import from a package it may not: the dashboard reads result files by name
MAY_IMPORT_MODULES: dict[str, set[str]] = {"dashboard": {"core.formats"}}
MAX_LINES = 400
CHECKED_DIRS = (*MAY_IMPORT, "tests", "bench")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every absolute module name `path` imports, at any depth (function-local imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from jobs import sft` imports the job jobs.sft
            names.update(f"{node.module}.{a.name}" for a in node.names if node.module == "jobs")
    return names


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for package, allowed in MAY_IMPORT.items():
        for path in modules(package):
            for name in imported(path):
                top = name.split(".")[0]
                exception = name in MAY_IMPORT_MODULES.get(package, set())
                if top in MAY_IMPORT and top != package and top not in allowed and not exception:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_file_names_module_imports_nothing() -> None:
    """core.formats is what the torch-free dashboard shares with the writers: it must stay import-free."""
    assert imported(ROOT / "core" / "formats.py") == set()


def test_no_job_imports_another_job() -> None:
    wrong = []
    for path in modules("jobs"):
        me = module_name(path)
        for name in imported(path):
            if name.startswith("jobs.") and name != me and name != JOBS_REGISTRY:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "jobs importing jobs (move the shared code into a library):\n" + "\n".join(sorted(wrong))


def test_no_library_imports_a_job() -> None:
    """Tests and benches may; the libraries never (a job is a leaf)."""
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for package in MAY_IMPORT
        if package != "jobs"
        for path in modules(package)
        for name in imported(path)
        if name.split(".")[0] == "jobs"
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("directory", CHECKED_DIRS)
def test_files_stay_small(directory: str) -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for path in sorted((ROOT / directory).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"files over {MAX_LINES} lines (split them):\n" + "\n".join(long)
