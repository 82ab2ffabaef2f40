"""Exceptions raised by uffd_aio (pure)."""

from __future__ import annotations


class UffdError(Exception):
    """Base class of uffd_aio's own errors."""


class FeatureUnavailable(UffdError):
    """The running kernel (or the uffd we were handed) lacks a required feature."""

    def __init__(self, missing: list[str], *, available: list[str], what: str = "") -> None:
        self.missing = missing
        self.available = available
        hint = f" (needed for {what})" if what else ""
        super().__init__(
            f"kernel lacks userfaultfd feature(s) {', '.join(missing)}{hint}; "
            f"this kernel offers: {', '.join(available) or 'none'}"
        )


class HandlerError(UffdError):
    """A fault handler failed or returned something unusable."""


class BadHandlerResult(HandlerError):
    """A handler returned data of the wrong size/type."""


class PagerClosed(UffdError):
    """The pager was closed while an operation was pending."""


class ResolveError(UffdError, OSError):
    """A resolve ioctl/write failed; ``errno`` and ``address`` tell which."""

    def __init__(self, errno: int, strerror: str, *, op: str, address: int, length: int) -> None:
        super().__init__(errno, f"{op} at {address:#x}+{length:#x}: {strerror}")
        self.op = op
        self.address = address
        self.length = length


class GILDeadlockRisk(UffdError):
    """Raised when Python code would touch registered memory while holding the GIL."""
