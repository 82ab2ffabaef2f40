"""uffd_aio.log without structlog configured: the standard library logger decides."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from uffd_aio import log


@pytest.fixture
def unconfigured(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # the test suite configures structlog (conftest.py); pretend an application did not
    monkeypatch.setattr(structlog, "is_configured", lambda: False)
    yield


def test_levels_and_rendering_follow_the_stdlib_logger(
        unconfigured: None, caplog: pytest.LogCaptureFixture) -> None:
    lg = log.get_logger(component="unit", fd=3)
    with caplog.at_level(logging.INFO, logger=log.LOGGER_NAME):
        lg.debug("uffd_aio.hidden")
        lg.info("uffd_aio.shown", path="/a b", n=2, empty="")
        lg.bind(client=7).warning("uffd_aio.bound")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "uffd_aio.shown component=unit fd=3 path='/a b' n=2 empty=''"),
        (logging.WARNING, "uffd_aio.bound component=unit fd=3 client=7"),
    ]


def test_exc_info_reaches_the_stdlib_handler(
        unconfigured: None, caplog: pytest.LogCaptureFixture) -> None:
    lg = log.get_logger(component="unit")
    try:
        raise ValueError("boom")
    except ValueError as exc:
        err = exc
    with caplog.at_level(logging.WARNING, logger=log.LOGGER_NAME):
        lg.error("uffd_aio.failed", exc_info=err)
    (rec,) = caplog.records
    assert rec.getMessage() == "uffd_aio.failed component=unit"
    assert rec.exc_info is not None and rec.exc_info[1] is err


def test_configured_structlog_gets_the_events() -> None:
    with structlog.testing.capture_logs() as logs:
        log.get_logger(component="unit").info("uffd_aio.x", a=1)
    assert logs == [{"event": "uffd_aio.x", "component": "unit", "a": 1, "log_level": "info"}]
