"""scripts/install.sh's "skipped when nothing changed", run on a copy of the repository whose
venv python is a stub that logs its calls (nothing is installed)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "scripts").mkdir()
    for name in ("pyproject.toml", "constraints.txt", "scripts/install.sh"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    log = tmp_path / "calls.log"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return tmp_path, log


def _install(root: Path, *extras: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MOEDIST_VENV"}
    subprocess.run(["bash", str(root / "scripts" / "install.sh"), *extras], cwd=root, env=env, check=True,
                   capture_output=True, text=True, timeout=60)


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.is_file() else []


def test_second_run_and_a_plain_run_after_a_test_run_are_skipped(repo):
    root, log = repo
    _install(root, "test")
    first = _calls(log)
    assert any("-e .[test]" in c for c in first)
    _install(root, "test")  # unchanged: nothing runs
    _install(root)  # `make run` after `make test`: the test install holds the runtime stack
    assert _calls(log) == first


def test_a_test_run_after_a_plain_one_installs_the_test_tools(repo):
    root, log = repo
    _install(root)
    n = len(_calls(log))
    _install(root, "test")
    assert any("-e .[test]" in c for c in _calls(log)[n:])


def test_a_changed_constraint_runs_the_install_again(repo):
    root, log = repo
    _install(root, "test")
    n = len(_calls(log))
    with open(root / "constraints.txt", "a") as f:
        f.write("# changed\n")
    _install(root, "test")
    assert len(_calls(log)) > n
