"""The library is quiet unless the application asks (issue 15): with neither structlog nor
logging configured only warnings and errors reach stderr; an application that configures
structlog or the standard library's logging sees every event.  Each case runs in a fresh
interpreter, since structlog's configuration is process-wide."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from tests.limits import limit

ROOT = pathlib.Path(__file__).resolve().parents[2]

# A tiny pager: faults served by native threads (the GIL rule), then a warning of its own.
_PAGER = """
import asyncio, logging, sys
import structlog
import uffd_aio
from uffd_aio import testing

how = sys.argv[1]
if how == "structlog":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
elif how == "stdlib":
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)

async def main() -> None:
    async with uffd_aio.Pager() as pager:
        region = pager.map(8 * 4096)

        @region.on_fault
        async def on_fault(ev: uffd_aio.PageFault) -> None:
            await ev.zero()

        await testing.scan(region.address, region.length, threads=2)
        assert pager.stats.faults >= 1
        if how == "warn":
            from uffd_aio.log import get_logger
            get_logger(component="test").warning("uffd_aio.test_warning", what="a warning")

asyncio.run(main())
"""


def _run(how: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-c", _PAGER, how], capture_output=True, text=True,
                       timeout=limit(60), cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr
    return p


@pytest.mark.timeout(limit(120))
def test_unconfigured_library_prints_nothing() -> None:
    p = _run("none")
    assert p.stdout == "" and p.stderr == ""


@pytest.mark.timeout(limit(120))
def test_unconfigured_library_still_reports_warnings_on_stderr() -> None:
    p = _run("warn")
    assert p.stdout == ""
    assert p.stderr.strip() == "uffd_aio.test_warning component=test what='a warning'"


@pytest.mark.timeout(limit(120))
def test_application_that_configures_structlog_sees_every_event() -> None:
    p = _run("structlog")
    assert p.stdout == ""
    for event in ("uffd_aio.ring_opened", "uffd_aio.pager_started", "uffd_aio.registered",
                  "uffd_aio.pager_closed"):
        assert event in p.stderr, p.stderr


@pytest.mark.timeout(limit(120))
def test_application_that_configures_stdlib_logging_sees_every_event() -> None:
    p = _run("stdlib")
    assert p.stdout == ""
    assert "DEBUG:uffd_aio:uffd_aio.ring_opened component=ring" in p.stderr, p.stderr
    assert "INFO:uffd_aio:uffd_aio.pager_closed component=pager" in p.stderr, p.stderr
