"""The remote_memory and compressed_memory examples run, small, and verify their data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.remote_memory.redis_local import REDIS_SERVER

ROOT = Path(__file__).resolve().parents[2]


def run_example(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    # own session: on timeout the example and any redis-server it started are killed
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"{args[0]} timed out:\n{out}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.timeout(120)
def test_remote_memory_example() -> None:
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"needs {REDIS_SERVER} (apt-get install redis-server)")
    r = run_example("examples/remote_memory/remote_memory.py", "--size", "8",
                    "--readahead", "off,adaptive", "--no-progress")
    assert r.returncode == 0, r.stdout
    assert r.stdout.count("yes, every byte") == 2, r.stdout
    assert "started redis-server" in r.stdout


@pytest.mark.timeout(120)
def test_compressed_memory_example() -> None:
    r = run_example("examples/compressed_memory/compressed_memory.py", "--size", "16",
                    "--budget", "2")
    assert r.returncode == 0, r.stdout
    assert "OK: every byte verified" in r.stdout, r.stdout
    assert " 0 written back" not in r.stdout


def test_examples_have_help() -> None:
    for ex in ("examples/remote_memory/remote_memory.py",
               "examples/compressed_memory/compressed_memory.py"):
        r = run_example(ex, "--help", timeout=30)
        assert r.returncode == 0 and "usage:" in r.stdout
