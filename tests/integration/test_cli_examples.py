"""The command and the small examples, run as a user would (subprocesses, with timeouts)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from uffd_aio.modes import PATCHED_FEATURES, Feature, feature_names
from uffd_aio.uffd import available_features

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)


def test_doctor_reports_the_kernels_features() -> None:
    p = run("-m", "uffd_aio.cli", "doctor", "--json")
    assert p.returncode == 0, p.stderr
    checks = {c["name"]: c for c in json.loads(p.stdout)}
    assert checks["uffd features"]["value"].split() == feature_names(int(available_features()))
    assert checks["io_uring"]["ok"] is True
    assert "READ" in checks["io_uring opcodes"]["value"].split()
    assert checks["liburing"]["value"][0].isdigit()
    have = available_features()
    for feat in (Feature.WRITE, Feature.POLL):
        check = checks[f"patched: {feat.name}"]
        assert check["ok"] is bool(have & feat), check  # what this kernel has
        if check["ok"]:
            assert check["value"] != "absent" and not check["reason"], check
        else:
            assert check["value"] == "absent" and "kernel_patches" in check["reason"], check
    patched = bool(have & PATCHED_FEATURES)
    # the write path and poll mode are probed on patched kernels only
    assert ("write path" in checks) is patched and ("poll mode" in checks) is patched
    ring = patched and checks["write path"]["ok"]
    assert checks["resolution backend"]["value"].startswith("ring" if ring else "ioctl")


def test_demo_verifies_every_byte_on_both_loops() -> None:
    p = run("-m", "uffd_aio.cli", "demo", "--size", "16", "--threads", "2", "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line.split() for line in p.stdout.splitlines()
            if line.split()[:1] in (["asyncio"], ["uvloop"])]
    assert len(rows) == 2 and all(int(r[1]) == 4096 for r in rows), p.stdout
    assert p.stdout.count("yes, every byte") == 2


def test_demo_rejects_bad_arguments() -> None:
    p = run("-m", "uffd_aio.cli", "demo", "--size", "0")
    assert p.returncode == 2 and "must be positive" in p.stderr


def test_embedding_example_serves_requests() -> None:
    p = run("examples/embed_in_service/service.py", "--self-test")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "'ok': False" not in p.stdout and "'ok': True" in p.stdout
