"""Shared test setup.

* Every async test runs on asyncio and on uvloop (pytest-asyncio's
  loop-factories hook).
* Every test has a timeout (pytest-timeout, pyproject.toml), and after each
  test any userfaultfd still open in this process is closed: the kernel then
  wakes every thread still waiting on a fault, so a pager bug cannot leave a
  native helper thread hanging past its test.
* Tests that need the uffd_aio kernel patches are marked ``patched_kernel``
  and skip elsewhere, with the reason.  On the patched kernel of the VM lane
  (``UFFD_AIO_EXPECT_PATCHED=1``) such a skip is a failure, and the summary
  says how many of them ran.
* Every pytest-timeout limit is scaled by the VM lane's measured speed factor
  (tests/limits.py).
* The suite is an application: it configures structlog (its defaults: every
  level, printed and captured by pytest), so the library's events reach
  ``structlog.testing.capture_logs`` wherever a pager was created
  (uffd_aio/log.py: an unconfigured structlog sends them to stdlib logging).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import structlog
import uvloop

from tests import limits
from uffd_aio.modes import PATCHED_FEATURES, Feature, feature_names
from uffd_aio.uffd import available_features

structlog.configure()

if os.environ.get("UFFD_AIO_IN_VM"):
    # the guest sees the repository read-only: no example database on disk
    from hypothesis import settings

    settings.register_profile("vm", database=None)
    settings.load_profile("vm")


_LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Any]:
    # UFFD_AIO_TEST_LOOPS=asyncio: the VM lane runs each async test on one loop (the loop
    # does not change what the kernel sees; the host runs both).
    names = [n for n in os.environ.get("UFFD_AIO_TEST_LOOPS", "asyncio,uvloop").split(",") if n]
    return {n: _LOOPS[n] for n in names}


def _uffd_fds() -> list[int]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[userfaultfd]":
                out.append(int(name))
        except OSError:
            pass
    return out


@pytest.fixture(autouse=True)
def _close_leftover_uffds() -> Iterator[None]:
    before = set(_uffd_fds())
    yield
    leaked = [fd for fd in _uffd_fds() if fd not in before]
    for fd in leaked:
        try:
            os.close(fd)
        except OSError:
            pass
    assert not leaked, f"test left userfaultfd fds open: {leaked}"


EXPECT_PATCHED = os.environ.get("UFFD_AIO_EXPECT_PATCHED") == "1"
_patched_ids: set[str] = set()
_patched_outcomes: dict[str, str] = {}


# What the VM lane leaves to the host (UFFD_AIO_TEST_SCALE=guest; kernel_patches/README.md):
# tests whose behaviour does not depend on the kernel beyond what the guest runs anyway. The
# guest is ~20-40x slower than the host under TCG; the host runs all of them on every run.
HOST_ONLY: dict[str, str] = {
    "tests/unit/": "pure: no kernel involved",
    "tests/integration/test_backend_examples.py": "examples through subprocesses: same paths",
    "tests/integration/test_cli_examples.py": "CLI through subprocesses: same paths",
    "tests/integration/test_backends.py::test_redis_restart_mid_run":
        "Redis client retry (test_redis_dirty_eviction_writes_back covers Redis in the guest)",
    "tests/integration/test_backends.py::test_redis_cluster_url": "Redis Cluster client routing",
    "tests/integration/test_backends.py::test_redis_concurrent_fetches": "store-side batching",
    "tests/integration/test_backends.py::test_redis_window_is_one_mget": "store-side batching",
    "tests/integration/test_backends.py::test_redis_server_fixture": "test fixture",
    "tests/integration/test_backends.py::test_replay": "replay scheduling (store side)",
    "tests/integration/test_crash_recovery.py": "server process management and the state dir",
    "tests/integration/test_soak.py": "the soak tool's reporting (its faults: test_handoff_server)",
    "tests/integration/test_handoff_receive.py": "socket protocol, no uffd served",
    "tests/integration/test_logging.py": "logging configuration",
    "tests/integration/test_resolution_await.py": "un-awaited coroutine detection",
    "tests/integration/test_range_gone_log.py": "log levels",
    "tests/integration/test_file_store.py": "file reads (block devices, truncation): store side",
}


def _deselect_host_only(config: Any, items: list[Any]) -> list[Any]:
    if not limits.IN_GUEST_SCALE:
        return items
    keep, drop = [], []
    for item in items:
        (drop if any(item.nodeid.startswith(p) for p in HOST_ONLY) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    return keep


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    items[:] = _deselect_host_only(config, items)
    _scale_timeouts(config, items)
    _patched_ids.update(item.nodeid for item in items if "patched_kernel" in item.keywords)
    missing = Feature(int(PATCHED_FEATURES) & ~int(available_features()))
    if not missing or EXPECT_PATCHED:
        # Expected patched but the features are missing: the tests run and fail
        # (pytest_runtest_makereport below), never turn into quiet skips.
        return
    skip = pytest.mark.skip(
        reason=f"needs the uffd_aio kernel patches (this kernel {os.uname().release} lacks "
        f"{' and '.join(feature_names(int(missing)))}); run `make -C kernel_patches kernel-test`")
    for item in items:
        if "patched_kernel" in item.keywords:
            item.add_marker(skip)


def _scale_timeouts(config: Any, items: list[Any]) -> None:
    if limits.TIME_FACTOR == 1.0:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        mark = item.get_closest_marker("timeout")
        base = float(mark.args[0]) if mark is not None and mark.args else \
            float(mark.kwargs.get("timeout", default)) if mark is not None else default
        if base > 0:
            item.add_marker(pytest.mark.timeout(limits.timeout(base)), append=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if item.nodeid not in _patched_ids:
        return
    if EXPECT_PATCHED and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"patched_kernel test skipped on the patched kernel "
                           f"({os.uname().release}): {reason}")
    if report.when == "call" or report.outcome != "passed":
        prev = _patched_outcomes.get(item.nodeid)
        if prev is None or prev == "passed":
            _patched_outcomes[item.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not _patched_ids:
        return
    counts = {k: sum(1 for v in _patched_outcomes.values() if v == k)
              for k in ("passed", "failed", "skipped")}
    terminalreporter.write_line(
        f"uffd_aio patched_kernel tests: {counts['passed']} passed / {counts['failed']} failed"
        f" / {counts['skipped']} skipped of {len(_patched_ids)} collected"
        + (" (patched kernel expected)" if EXPECT_PATCHED else ""))
