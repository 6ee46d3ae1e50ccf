"""`python -m bsfind` in a child process, and reading its stderr (the signal tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping

from tests.conftest import ROOT


def start_bsfind(*args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m bsfind ARGS`` with unbuffered output, stdout and stderr piped."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "bsfind", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_stderr(proc: subprocess.Popen[str], needle: str, timeout: float = 60.0) -> str:
    """Read stderr lines until one contains ``needle``; kill the child if none does."""
    assert proc.stderr is not None
    seen = ""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if needle in line:
            return seen
    proc.kill()
    raise AssertionError(f"{needle!r} never appeared on stderr: {seen!r}")
