"""Shared test setup.

* Every async test runs on asyncio and on uvloop (pytest-asyncio's
  loop-factories hook).
* Every test has a timeout (pytest-timeout, pyproject.toml), and after each
  test any userfaultfd still open in this process is closed: the kernel then
  wakes every thread still waiting on a fault, so a pager bug cannot leave a
  native helper thread hanging past its test.
* Tests that need the uffd_aio kernel patches are marked ``patched_kernel``
  and skip elsewhere, with the reason.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import uvloop

from uffd_aio.modes import PATCHED_FEATURES, Feature, feature_names
from uffd_aio.uffd import available_features

if os.environ.get("UFFD_AIO_IN_VM"):
    # the guest sees the repository read-only: no example database on disk
    from hypothesis import settings

    settings.register_profile("vm", database=None)
    settings.load_profile("vm")


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Any]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


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


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    missing = Feature(int(PATCHED_FEATURES) & ~int(available_features()))
    if not missing:
        return
    skip = pytest.mark.skip(
        reason=f"needs the uffd_aio kernel patches (this kernel {os.uname().release} lacks "
        f"{' and '.join(feature_names(int(missing)))}); run `make -C kernel_patches kernel-test`")
    for item in items:
        if "patched_kernel" in item.keywords:
            item.add_marker(skip)
