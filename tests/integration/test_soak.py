"""``uffd-aio soak``, CI-sized: a short run passes and reports; wrong bytes fail it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def soak(*argv: Any) -> tuple[int, dict[str, Any], str]:
    """Run the command (its own process group: a hang kills it and everything it started,
    and the test fails with its output)."""
    if not os.access(ROOT / "benchmarks" / "c" / "Makefile", os.R_OK):
        pytest.skip("needs benchmarks/c")
    p = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), "-m", "uffd_aio", "soak",
                          "--json", "--loop", "asyncio", "--client-timeout", "60",
                          *map(str, argv)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"soak did not finish within 240 s (killed)\n{out}\n{err}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    lines = out.strip().splitlines()
    assert lines, (p.returncode, out, err)
    report: dict[str, Any] = json.loads(lines[-1])
    return p.returncode, report, err


def test_short_soak_passes_and_reports() -> None:
    rc, r, err = soak("--clients", 3, "--threads", 2, "--pages", 256, "--regions", 2,
                      "--faults", 3072, "--seed", 1)
    assert rc == 0, (r, err)
    assert r["ok"] is True and r["leaks"] == [] and r["first_errors"] == []
    assert r["runs"] >= 12 and r["pages_touched"] == 256 * r["runs"]
    assert r["server_faults"] == r["pages_touched"]  # no read-ahead: one fault per page
    assert r["wrong_words"] == r["client_failures"] == r["server_errors"] == 0
    assert r["fds_start"] == r["fds_end"] and r["fds_max"] >= r["fds_end"]
    assert r["rss_start"] > 0 and r["rss_max"] >= r["rss_end"] > 0


def test_wrong_bytes_fail_the_soak() -> None:
    # a zero backend instead of the snapshot: every checked word is wrong
    rc, r, err = soak("--clients", 1, "--threads", 1, "--pages", 64, "--faults", 64,
                      "--backend", "zero")
    assert rc == 1, (r, err)
    assert r["ok"] is False and r["wrong_words"] == 64 * 512
    assert "verified False" in r["first_errors"][0]
