"""Userfaultfd: one uffd, its feature negotiation, registration and every resolve ioctl.

Errors carry context (operation, range, errno).  Semantics the pager relies on:

* EEXIST from COPY/ZEROPAGE/CONTINUE means "already resolved": those pages
  are skipped, the rest of the range is still resolved, and the range is
  woken (the kernel does not wake on EEXIST).
* A partial result (the kernel returns -EAGAIN with progress) is continued.
* EAGAIN with no progress means the mm is changing (fork/mremap/madvise in
  flight): :class:`MmChanging` is raised so the caller can read pending
  events first and retry.
* ENOENT/ESRCH mean the range or the whole mm is gone (:class:`RangeGone`):
  nothing is waiting there any more.
"""

from __future__ import annotations

import asyncio
import errno as E
import functools
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import structlog

from uffd_aio import modes
from uffd_aio.binding import lowlevel as ll
from uffd_aio.errors import FeatureUnavailable, MoveError, ResolveError
from uffd_aio.log import get_logger
from uffd_aio.modes import Feature, Ioctl, Mode


class MmChanging(ResolveError):
    """EAGAIN: the address space is changing; read pending events, then retry."""

    def __init__(self, *, op: str, address: int, length: int, done: int) -> None:
        super().__init__(E.EAGAIN, os.strerror(E.EAGAIN), op=op, address=address, length=length)
        self.done = done


class RangeGone(ResolveError):
    """ENOENT/ESRCH: the range is no longer registered, or its process has exited."""


#: A resolution that meets EAGAIN (:class:`MmChanging`) is tried again every
#: EAGAIN_RETRY_INTERVAL s, at most EAGAIN_MAX_RETRIES times (2 s), by when the
#: pending REMAP/REMOVE/UNMAP events have long been read and applied.
EAGAIN_RETRY_INTERVAL = 0.001
EAGAIN_MAX_RETRIES = 2000

_T = TypeVar("_T")


async def retry_while_mm_changing(attempt: Callable[[], Awaitable[_T]], *, op: str,
                                  address: int, length: int,
                                  on_retry: Callable[[], None] | None = None) -> _T:
    """Await ``attempt()`` again (after a first one raised :class:`MmChanging`) until it
    does not raise :class:`MmChanging`; past EAGAIN_MAX_RETRIES, ResolveError(EAGAIN).
    ``on_retry`` runs before each attempt (to count retries)."""
    for _ in range(EAGAIN_MAX_RETRIES):
        if on_retry is not None:
            on_retry()
        await asyncio.sleep(EAGAIN_RETRY_INTERVAL)
        try:
            return await attempt()
        except MmChanging:
            continue
    raise ResolveError(E.EAGAIN, "address space kept changing", op=op, address=address,
                       length=length)


PAGE_SIZE = ll.PAGE_SIZE


@functools.cache
def available_features() -> Feature:
    """Features the running kernel offers (probed once on a throwaway uffd)."""
    fd, _ = ll.uffd_open(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        rc, features, _ = ll.uffd_api(fd, 0)
        if rc < 0:
            raise ll.oserror(rc, "UFFDIO_API probe")
        return Feature(features)
    finally:
        os.close(fd)


def _raise(rc: int, op: str, address: int, length: int, done: int = 0) -> None:
    err = -rc
    if err == E.EAGAIN:
        raise MmChanging(op=op, address=address, length=length, done=done)
    if err in (E.ENOENT, E.ESRCH):
        raise RangeGone(err, os.strerror(err), op=op, address=address, length=length)
    raise ResolveError(err, os.strerror(err), op=op, address=address, length=length)


@attrs.define(eq=False)
class Userfaultfd:
    """An open, API-negotiated userfaultfd (always O_NONBLOCK | O_CLOEXEC).

    Create with :meth:`open`, or wrap a uffd handed over by another process
    with :meth:`from_fd` (its features were negotiated by that process).
    """

    fd: int
    features: Feature
    ioctls: Ioctl
    via_dev: bool = False
    owned: bool = True
    writer_fd: int | None = None
    #: page size at an address (the pager's regions; hugetlbfs ranges are not 4 KiB):
    #: an existing page (EEXIST) is skipped by that much
    page_size_of: Callable[[int], int] | None = attrs.field(default=None, repr=False)
    _log: structlog.typing.FilteringBoundLogger = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._log = get_logger(component="uffd", uffd=self.fd)

    @classmethod
    def open(
        cls,
        features: Feature | int = modes.DEFAULT_FEATURES,
        *,
        required: Feature | int = Feature(0),
        user_mode_only: bool = False,
    ) -> Userfaultfd:
        """Open a uffd asking for ``features`` where available; ``required`` ones must exist.

        Tries /dev/userfaultfd (USERFAULTFD_IOC_NEW, 6.1+), then userfaultfd(2).
        """
        available = available_features()
        # int arithmetic: ~ on an IntFlag only inverts the bits it knows
        missing = int(required) & ~int(available)
        if missing:
            raise FeatureUnavailable(modes.feature_names(missing),
                                     available=modes.feature_names(available))
        wanted = Feature((int(features) | int(required)) & int(available))
        flags = os.O_CLOEXEC | os.O_NONBLOCK
        if user_mode_only:
            flags |= modes.UFFD_USER_MODE_ONLY
        fd, via_dev = ll.uffd_open(flags)
        rc, _, ioctls = ll.uffd_api(fd, int(wanted))
        if rc < 0:
            os.close(fd)
            raise ll.oserror(rc, f"UFFDIO_API features={modes.feature_names(wanted)}")
        uffd = cls(fd, wanted, Ioctl(ioctls), via_dev)
        uffd._log.debug("uffd_aio.uffd_opened", features=modes.feature_names(wanted),
                        via_dev=via_dev)
        return uffd

    @classmethod
    def from_fd(cls, fd: int, features: Feature | int = Feature(0), *,
                owned: bool = True) -> Userfaultfd:
        """Wrap a uffd on which another process already did UFFDIO_API.

        ``features`` is what that process negotiated, if known (the kernel
        cannot be asked again).  The fd is made non-blocking.
        """
        os.set_blocking(fd, False)
        return cls(fd, Feature(features), Ioctl(0), False, owned)

    def has(self, feature: Feature) -> bool:
        return bool(self.features & feature)

    # ---- registration --------------------------------------------------

    def register(self, start: int, length: int, mode: Mode | int = Mode.MISSING) -> Ioctl:
        """UFFDIO_REGISTER; returns the resolve ioctls the range supports."""
        got = Ioctl(ll.uffd_register(self.fd, start, length, int(mode)))
        self._log.debug("uffd_aio.registered", start=hex(start), length=length,
                        mode=str(Mode(mode)))
        return got

    def unregister(self, start: int, length: int) -> None:
        ll.uffd_unregister(self.fd, start, length)

    # ---- resolution ------------------------------------------------------

    def wake(self, start: int, length: int) -> None:
        rc = ll.uffd_wake(self.fd, start, length)
        if rc < 0:
            _raise(rc, "UFFDIO_WAKE", start, length)

    def _fill(self, op: str, fn: object, start: int, length: int, mode: int,
              dontwake_bit: int, src: int | None = None) -> int:
        """Drive COPY/ZEROPAGE/CONTINUE to the end of the range: continue partial
        results, skip pages that already exist, wake once at the end."""
        done = 0
        skipped = False
        dontwake = bool(mode & dontwake_bit)
        ps = PAGE_SIZE
        while done < length:
            if src is None:
                rc, n = fn(self.fd, start + done, length - done, mode | dontwake_bit)  # type: ignore[operator]
            else:
                rc, n = fn(self.fd, start + done, src + done, length - done,  # type: ignore[operator]
                           mode | dontwake_bit)
            if rc == 0:
                done = length
                break
            if n > 0:  # partial progress (kernel reports -EAGAIN): continue
                done += n
                continue
            if rc == -E.EEXIST:  # this page is already there: skip it
                done += ps if self.page_size_of is None else self.page_size_of(start + done)
                skipped = True
                continue
            if rc == -E.EAGAIN and done:
                continue
            _raise(rc, op, start + done, length - done, done)
        if not dontwake:
            rc = ll.uffd_wake(self.fd, start, length)
            if rc < 0 and rc not in (-E.ENOENT, -E.ESRCH):
                _raise(rc, "UFFDIO_WAKE", start, length)
        if skipped:
            self._log.debug("uffd_aio.already_resolved", op=op, start=hex(start), length=length)
        return done

    def copy(self, dst: int, src: int, length: int, *, wp: bool = False,
             dontwake: bool = False) -> int:
        """UFFDIO_COPY ``length`` bytes from address ``src`` to ``dst``; bytes covered."""
        mode = (modes.COPY_MODE_WP if wp else 0) | (modes.COPY_MODE_DONTWAKE if dontwake else 0)
        return self._fill("UFFDIO_COPY", ll.uffd_copy, dst, length, mode,
                          modes.COPY_MODE_DONTWAKE, src)

    def copy_fast(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        """One UFFDIO_COPY that wakes on success: the fault path's common case.

        Returns 0 on full success, else -errno (caller falls back to :meth:`copy`).
        """
        rc, _ = ll.uffd_copy(self.fd, dst, src, length, mode)
        return rc

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        mode = modes.ZEROPAGE_MODE_DONTWAKE if dontwake else 0
        return self._fill("UFFDIO_ZEROPAGE", ll.uffd_zeropage, start, length, mode,
                          modes.ZEROPAGE_MODE_DONTWAKE)

    def mm_alive(self, probe: int) -> bool:
        """Whether the address space this uffd serves still exists.

        The kernel sends no event when a fork child's address space goes away (the
        child exited or exec'd), so a pager asks: a ``UFFDIO_ZEROPAGE`` of one page at
        ``probe`` is refused with ``ESRCH`` once the mm is gone.  ``probe`` must be a page
        outside every range registered on this uffd: a live mm then refuses it too
        (``ENOENT``/``EINVAL``, or ``EAGAIN`` while it changes) and nothing is installed.
        """
        rc, _ = ll.uffd_zeropage(self.fd, probe, PAGE_SIZE, modes.ZEROPAGE_MODE_DONTWAKE)
        if rc >= 0:  # cannot happen outside the registered ranges; say so, keep the uffd
            self._log.warning("uffd_aio.mm_probe_installed", address=hex(probe))
        return rc != -E.ESRCH

    def continue_(self, start: int, length: int, *, wp: bool = False,
                  dontwake: bool = False) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages already there (MINOR faults)."""
        mode = (modes.CONTINUE_MODE_WP if wp else 0) | (
            modes.CONTINUE_MODE_DONTWAKE if dontwake else 0)
        return self._fill("UFFDIO_CONTINUE", ll.uffd_continue, start, length, mode,
                          modes.CONTINUE_MODE_DONTWAKE)

    def poison(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_POISON: later accesses get SIGBUS (6.6+, Feature.POISON)."""
        mode = modes.POISON_MODE_DONTWAKE if dontwake else 0
        return self._fill("UFFDIO_POISON", ll.uffd_poison, start, length, mode,
                          modes.POISON_MODE_DONTWAKE)

    def writeprotect(self, start: int, length: int, *, protect: bool,
                     dontwake: bool = False) -> None:
        """UFFDIO_WRITEPROTECT: protect, or unprotect (which wakes unless dontwake)."""
        mode = (modes.WRITEPROTECT_MODE_WP if protect else 0) | (
            modes.WRITEPROTECT_MODE_DONTWAKE if dontwake else 0)
        rc = ll.uffd_writeprotect(self.fd, start, length, mode)
        if rc < 0:
            _raise(rc, "UFFDIO_WRITEPROTECT", start, length)

    def move(self, dst: int, src: int, length: int, *, dontwake: bool = False,
             allow_src_holes: bool = False) -> int:
        """UFFDIO_MOVE (6.8+): move pages from ``src`` into the missing range at ``dst``.

        Both ranges must be private anonymous memory of the process that owns
        this uffd, with the same protection; the source becomes a hole.  Returns
        bytes moved: ``length``, or less when the address space changed after
        some pages were moved (the rest stays at the source).  Raises
        :class:`~uffd_aio.errors.MoveError` (``EBUSY`` shared source page,
        ``ENOENT`` hole in the source, ``EEXIST`` destination present,
        ``EINVAL`` incompatible mappings; ``done`` = bytes moved before it),
        :class:`MmChanging` (nothing moved yet) or :class:`RangeGone` (``ESRCH``).
        """
        mode = (modes.MOVE_MODE_DONTWAKE if dontwake else 0) | (
            modes.MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0)
        done = 0
        while done < length:
            rc, n = ll.uffd_move(self.fd, dst + done, src + done, length - done, mode)
            if rc == 0:
                return length
            if n > 0:  # partial (the kernel reports -EAGAIN with progress): continue
                done += n
                continue
            if rc == -E.EAGAIN:
                if done:  # the rest after a change of the address space: report what moved
                    return done
                raise MmChanging(op="UFFDIO_MOVE", address=dst, length=length, done=0)
            if rc == -E.ESRCH:
                _raise(rc, "UFFDIO_MOVE", dst + done, length - done, done)
            raise MoveError(-rc, os.strerror(-rc), op="UFFDIO_MOVE", address=dst + done,
                            length=length - done, src=src + done, done=done)
        return done

    # ---- lifetime -----------------------------------------------------------

    def close(self) -> None:
        """Close the fd (the kernel then unregisters everything and wakes all waiters)."""
        # the writer fd (UFFDIO_WRITE_FD) is always ours, and keeps the context
        # (registrations, waiting threads) alive until it is closed too
        for fd, ours in ((self.writer_fd, True), (self.fd, self.owned)):
            if fd is not None and fd >= 0 and ours:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = -1
        self.writer_fd = None

    @property
    def closed(self) -> bool:
        return self.fd < 0
