"""Exceptions raised by uffd_aio (pure)."""

from __future__ import annotations

import errno as _errno


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


class PagerFailed(UffdError):
    """A handler failed under ``on_error="raise"``; the pager stopped serving."""


class HandlerTimeout(UffdError, TimeoutError):
    """A fault handler ran longer than ``handler_timeout``."""


class ResolveError(UffdError, OSError):
    """A resolve ioctl/write failed; ``errno`` and ``address`` tell which."""

    def __init__(self, errno: int, strerror: str, *, op: str, address: int, length: int) -> None:
        super().__init__(errno, f"{op} at {address:#x}+{length:#x}: {strerror}")
        self.op = op
        self.address = address
        self.length = length


class MoveError(ResolveError):
    """UFFDIO_MOVE refused (``errno`` says why; the message adds what to do).

    ``done``: bytes moved before the failure (the kernel stops at the first page
    it cannot move; what follows stays at the source).  The usual reasons:

    * ``EBUSY``: a source page is shared (the process forked since it was
      written, KSM) or pinned: MOVE takes only pages this process owns
      exclusively (``MADV_DONTFORK`` on the source avoids the fork case);
    * ``ENOENT``: a hole in the source (never written, or moved already), or
      the source is not mapped; ``allow_src_holes=True`` skips holes;
    * ``EEXIST``: the destination page is already there (another resolution
      won the race): the source pages stay where they are;
    * ``EINVAL``: source and destination are not both private anonymous memory
      with the same protection (MOVE does not work on shmem, hugetlbfs or file
      mappings), or the uffd belongs to another process's memory.
    """

    HINTS = {
        "EBUSY": "a source page is shared (fork, KSM) or pinned; MOVE takes only pages "
                 "owned exclusively (MADV_DONTFORK on the source buffer avoids the fork "
                 "case); COPY it instead",
        "ENOENT": "the source has a hole there (never written, or already moved) or is "
                  "not mapped; pass allow_src_holes=True to skip holes",
        "EEXIST": "the destination page is already present (resolved by someone else); "
                  "the source pages stay where they are",
        "EINVAL": "source and destination must both be private anonymous memory of this "
                  "process with the same protection (not shmem, hugetlbfs or a file), "
                  "page-aligned and not overlapping",
    }

    def __init__(self, errno: int, strerror: str, *, op: str, address: int, length: int,
                 src: int, done: int = 0) -> None:
        hint = self.HINTS.get(_errno.errorcode.get(errno, ""), "")
        super().__init__(errno, f"{strerror} (source {src:#x}){': ' + hint if hint else ''}",
                         op=op, address=address, length=length)
        self.src = src
        self.done = done


class GILDeadlockRisk(UffdError):
    """Raised when Python code would touch registered memory while holding the GIL."""


class MissingExtra(UffdError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it.

    ``uffd-aio`` keeps its hard dependencies to what every pager needs; the Redis
    backend (``redis``), the compressed backend (``zstd``), the server's Prometheus
    metrics (``metrics``) and the benchmark plots (``plots``) are extras.
    """

    def __init__(self, package: str, extra: str, feature: str) -> None:
        self.package = package
        self.extra = extra
        self.install = f"pip install 'uffd-aio[{extra}]'"
        super().__init__(f"{feature} needs the {package!r} package, which is not installed: "
                         f"{self.install}", name=package)
