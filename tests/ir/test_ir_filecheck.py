"""Runs the textual IR tests in tests/ir/checks: each ``.sir`` file's ``// RUN:`` line (with
``%s`` for the file) must exit 0; CHECK lines are matched by filecheck (LLVM FileCheck's
Python clone)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).parent / "checks"
BIN = Path(sys.executable).parent


def run_lines(path: Path) -> list[str]:
    return [line.split("RUN:", 1)[1].strip() for line in path.read_text().splitlines()
            if line.lstrip().startswith("// RUN:")]


@pytest.mark.parametrize("path", sorted(CHECKS.glob("*.sir")), ids=lambda p: p.name)
def test_filecheck(path):
    lines = run_lines(path)
    assert lines, f"{path.name} has no RUN line"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for cmd in lines:
        cmd = cmd.replace("%s", shlex.quote(str(path)))
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0, f"{path.name}: {cmd}\n{r.stdout}\n{r.stderr}"
