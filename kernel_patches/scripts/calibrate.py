"""Speed calibration for the VM lane: how much slower the guest runs than the host.

The guest runs under QEMU TCG, whose speed depends on the machine and on what else runs on
it; limits written for the host (pytest-timeout marks, asyncio.timeout waits, the stall
guard, the suite's hard limit) must follow it.  The same fixed workload is timed on the host
right before the boot and in the guest right before the suite; the ratio is the factor.

    calibrate.py measure OUT.json            time the workload here, write the figures
    calibrate.py limits HOST.json GUEST.json print shell assignments: FACTOR, TIMEOUT, STALL, HARD

The workload has the two kinds of work the suite does: pure-Python CPU (decoding, dispatch,
handlers) and faults served by the pager (kernel entries, io_uring, TLB/page-table work, which
TCG slows differently).  Each part is timed three times; the minimum counts (noise only
adds).  Run with the project's venv Python.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

# Floor and ceiling of the factor: below 1 the host limits already hold; the ceiling keeps
# a hang's cost bounded (the host limits are already >= 20x what most tests need).
FLOOR = 1.0
CEILING = 20.0
# Host-tuned limits that the factor scales (seconds).
HOST_TEST_TIMEOUT = 120       # pyproject.toml's default per-test timeout (marks are <= 300)
HOST_SUITE_BUDGET = 150       # the guest's test selection on the host, with 2x headroom
# Bounds of the suite's hard limit (seconds): a hang must still end inside the CI budget.
MIN_HARD, MAX_HARD = 900, 3300
FAULT_REGION = 32 << 20


def _cpu() -> float:
    t0 = time.perf_counter()
    acc = 0
    d: dict[int, int] = {}
    for i in range(1_200_000):
        acc = (acc * 31 + i) & 0xFFFFFFFF
        d[i & 1023] = acc
    if not d:  # keep the work observable
        raise AssertionError
    return time.perf_counter() - t0


async def _faults_async() -> float:
    import uffd_aio
    from uffd_aio import testing

    async with uffd_aio.Pager() as pager:
        region = pager.map(FAULT_REGION)
        zeros = bytes(region.page_size)

        @region.on_fault
        def on_fault(ev: uffd_aio.PageFault) -> bytes:
            return zeros

        t0 = time.perf_counter()
        await asyncio.wait_for(testing.scan(region.address, region.length, threads=1), 600)
        return time.perf_counter() - t0


def _faults() -> float:
    return asyncio.run(_faults_async())


def measure() -> dict[str, float]:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    cpu = min(_cpu() for _ in range(3))
    faults = min(_faults() for _ in range(3))
    return {"cpu_s": round(cpu, 4), "faults_s": round(faults, 4), "total_s": round(cpu + faults, 4)}


def limits(host: dict[str, float], guest: dict[str, float]) -> dict[str, float | int]:
    """The factor (guest time / host time of the same work, clamped) and the limits it gives."""
    raw = guest["total_s"] / max(host["total_s"], 1e-6)
    factor = min(max(raw, FLOOR), CEILING)
    timeout = int(HOST_TEST_TIMEOUT * factor)
    # The stall guard must not fire before pytest-timeout reports a slow test by itself
    # (the few longer marks are bounded by the hard limit, which also dumps the stacks).
    stall = timeout + 120
    hard = min(max(int(HOST_SUITE_BUDGET * factor), MIN_HARD), MAX_HARD)
    return {"RAW_FACTOR": round(raw, 2), "FACTOR": round(factor, 2), "TIMEOUT": timeout,
            "STALL": stall, "HARD": hard}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "measure":
        figures = measure()
        Path(argv[1]).write_text(json.dumps(figures) + "\n")
        print(f"calibrate: {figures}", file=sys.stderr)
        return 0
    if len(argv) == 3 and argv[0] == "limits":
        host = json.loads(Path(argv[1]).read_text())
        guest = json.loads(Path(argv[2]).read_text())
        for k, v in limits(host, guest).items():
            print(f"{k}={v}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
