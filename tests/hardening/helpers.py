"""One way to run a bad input through `nsalign` and check how it ends: exit 2, exactly one line on
stderr naming the problem, and no file left behind that was not there before."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from jobs.cli import main


@dataclass
class BadInput:
    """One row of a bad-input table: the argv after `nsalign`, a fragment the error line must contain,
    and the directories that must gain no file (besides those the test itself created beforehand)."""

    name: str
    argv: list[str]
    message: str  # a case-insensitive fragment of the one error line
    watch: list[Path] = field(default_factory=list)


# a tqdm progress line ("sft:  40%|####      | 2/5 [00:01<00:01, 2.0it/s]"): progress, not an error line
PROGRESS = re.compile(r"^[^|]*\d+%\|.*\|")


def snapshot(dirs: list[Path]) -> set[str]:
    """Every path (files and directories, hidden ones included) under `dirs`."""
    seen: set[str] = set()
    for d in dirs:
        if d.exists():
            for root, subdirs, files in os.walk(d):
                seen.update(os.path.join(root, n) for n in subdirs + files)
    return seen


def run_bad_input(case: BadInput, capsys: pytest.CaptureFixture) -> str:
    """Run `nsalign <argv>`; assert exit 2, one stderr line containing `case.message`, nothing new
    under `case.watch`. Returns the error line."""
    before = snapshot(case.watch)
    capsys.readouterr()  # drop anything printed while the test set itself up
    code = main(list(case.argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert code == 2, f"{case.name}: exit {code}, stderr:\n{err}"
    assert len(lines) == 1, f"{case.name}: expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("nsalign "), lines[0]
    assert case.message.lower() in lines[0].lower(), f"{case.name}: {lines[0]!r} lacks {case.message!r}"
    new = sorted(snapshot(case.watch) - before)
    assert not new, f"{case.name}: left behind {new}"
    return lines[0]


def patch_everywhere(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str, value: object) -> None:
    """Replace `module.name` and every imported module's own reference to it (`from module import name`
    binds the function where it is used), so a guard sees every call."""
    real = getattr(module, name)
    for other in list(sys.modules.values()):
        if other is not None and other is not module and getattr(other, name, None) is real:
            monkeypatch.setattr(other, name, value)
    monkeypatch.setattr(module, name, value)
