"""The one EAGAIN retry loop (uffd.retry_while_mm_changing), used by explicit resolutions
and prefetch copies (the batched path retries with call_later on the same constants)."""

from __future__ import annotations

import errno

import pytest

from uffd_aio import uffd
from uffd_aio.errors import ResolveError
from uffd_aio.uffd import MmChanging, retry_while_mm_changing


async def test_retries_until_the_mm_settles() -> None:
    calls: list[int] = []
    retries: list[int] = []

    async def attempt() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise MmChanging(op="copy", address=0x1000, length=4096, done=0)
        return 4096

    n = await retry_while_mm_changing(attempt, op="copy", address=0x1000, length=4096,
                                      on_retry=lambda: retries.append(1))
    assert n == 4096 and len(calls) == 3 and len(retries) == 3


async def test_gives_up_with_eagain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uffd, "EAGAIN_MAX_RETRIES", 5)
    calls: list[int] = []

    async def attempt() -> int:
        calls.append(1)
        raise MmChanging(op="zero", address=0x2000, length=8192, done=0)

    with pytest.raises(ResolveError, match="address space kept changing") as info:
        await retry_while_mm_changing(attempt, op="zero", address=0x2000, length=8192)
    assert info.value.errno == errno.EAGAIN and info.value.address == 0x2000
    assert len(calls) == 5


async def test_other_errors_are_not_retried() -> None:
    async def attempt() -> int:
        raise ResolveError(errno.EINVAL, "bad", op="copy", address=0, length=4096)

    with pytest.raises(ResolveError) as info:
        await retry_while_mm_changing(attempt, op="copy", address=0, length=4096)
    assert info.value.errno == errno.EINVAL
