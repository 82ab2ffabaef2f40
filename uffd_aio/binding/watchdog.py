"""Thin binding of the native loop-stall watchdog (csrc/watchdog.c).

The watchdog is the only thing that can still act when a Python thread has
deadlocked an in-process pager by touching registered memory while holding
the GIL: it is a plain pthread that reads a heartbeat the loop bumps and
polls the ring fd, and writes a message to stderr (docs/gil.md).
"""

from __future__ import annotations

from uffd_aio.binding._native import ffi, lib


class StallWatchdog:
    """Warn on stderr when work waits for a loop (ring completions, or uffd messages
    not picked up; ``uffd`` may be -1) and the loop stops draining the ring."""

    __slots__ = ("_h", "_hb", "timeout")

    def __init__(self, ring_fd: int, uffd: int, timeout: float, message: str) -> None:
        if timeout <= 0:
            raise ValueError("watchdog timeout must be positive")
        self.timeout = timeout
        self._hb = ffi.new("uint64_t[1]")
        h = lib.ua_watchdog_start(ring_fd, uffd, self._hb, max(1, int(timeout * 1000)),
                                  message.encode())
        if h == ffi.NULL:
            raise OSError("could not start the uffd_aio watchdog thread")
        self._h = h

    def beat(self) -> None:
        """Called by the loop each time it drains the ring."""
        self._hb[0] += 1

    @property
    def fired(self) -> int:
        """How many stalls were reported."""
        return int(lib.ua_watchdog_fired(self._h)) if self._h is not None else 0

    def close(self) -> None:
        if self._h is not None:
            lib.ua_watchdog_stop(self._h)
            self._h = None
