"""scripts/run-bounded.py, the host suite's outer limit, on commands that hang on purpose."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WRAPPER = str(ROOT / "scripts" / "run-bounded.py")
# a tool of the host lane; under TCG even the Python child's start could outlast the limit
pytestmark = pytest.mark.skipif(bool(os.environ.get("UFFD_AIO_IN_VM")),
                                reason="scripts/run-bounded.py bounds the host lane only")


def bounded(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, WRAPPER, *args], capture_output=True, text=True,
                          timeout=120, check=False)


def gone(pid: int) -> bool:
    """The process is dead (reaped, or a zombie nobody reaped yet); waits up to 10 s."""
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_passes_the_status_on_and_kills_what_the_command_left(tmp_path: pathlib.Path) -> None:
    pidfile = tmp_path / "pid"
    p = bounded("--", "sh", "-c", f"sleep 60 & echo $! > {pidfile}; exit 3")
    assert p.returncode == 3, p.stderr
    assert "left 1 process(es) running" in p.stderr
    assert gone(int(pidfile.read_text()))


def test_limit_dumps_the_tree_and_exits_124(tmp_path: pathlib.Path) -> None:
    dump = tmp_path / "dump"
    p = bounded("--limit", "0.5", "--no-gdb", "--dump-dir", str(dump), "--", "sleep", "60")
    assert p.returncode == 124, p.stderr
    assert "LIMIT EXPIRED" in p.stderr and f"Evidence in {dump}" in p.stderr
    ps = (dump / "ps.txt").read_text().splitlines()
    assert len(ps) == 3, ps  # header lines and the one process
    (proc,) = dump.glob("proc-*.txt")
    assert "=== tid" in proc.read_text() and "wchan" in proc.read_text()


@pytest.mark.timeout(90)
def test_limit_gets_python_stacks_and_kills_a_grandchild_that_left_the_group(
        tmp_path: pathlib.Path) -> None:
    dump = tmp_path / "dump"
    pidfile = tmp_path / "pid"
    child = ("import subprocess, time\n"
             "g = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
             f"open({str(pidfile)!r}, 'w').write(str(g.pid))\n"
             "def waiting_here(): time.sleep(60)\n"
             "waiting_here()\n")
    # 10 s: time for the child to start Python and enable faulthandler on a loaded machine
    p = bounded("--limit", "10", "--no-gdb", "--dump-dir", str(dump), "--",
                sys.executable, "-X", "faulthandler", "-c", child)
    assert p.returncode == 124, p.stderr
    assert pidfile.exists(), f"the child did not start within the limit: {p.stderr}"
    grandchild = int(pidfile.read_text())
    # faulthandler got SIGABRT and printed the Python stack
    assert "Fatal Python error: Aborted" in p.stderr and "waiting_here" in p.stderr, p.stderr
    assert f"\n{grandchild} " in (dump / "ps.txt").read_text()
    assert (dump / f"proc-{grandchild}.txt").exists()
    assert gone(grandchild)
