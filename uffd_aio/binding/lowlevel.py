"""Thin typed layer over the cffi binding: -errno -> OSError, addresses as ints.

The only module that touches ``ffi``/``lib`` (pynacl's layering): the ring
engine and :mod:`uffd_aio.uffd` call these functions (the test helpers are a
separate extension: :mod:`uffd_aio.testing._lowlevel`).  They are deliberately
small: some sit on the fault path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence, Sized
from typing import TYPE_CHECKING, TypeAlias

from uffd_aio.binding._native import ffi, lib

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

#: a cffi object Python only hands back to C (a ``struct ua_ring *``...): opaque here
CData: TypeAlias = object

# io_uring opcodes (include/uapi/linux/io_uring.h; numbers are ABI)
OP_NOP = 0
OP_READV = 1
OP_WRITEV = 2
OP_READ_FIXED = 4
OP_WRITE_FIXED = 5
OP_POLL_ADD = 6
OP_ASYNC_CANCEL = 14
OP_READ = 22
OP_WRITE = 23
OP_READ_MULTISHOT = 49  # 6.7+; liburing 2.3 has no helper, we prep it by number
OPCODE_NAMES = {
    OP_NOP: "NOP",
    OP_READV: "READV",
    OP_WRITEV: "WRITEV",
    OP_READ_FIXED: "READ_FIXED",
    OP_WRITE_FIXED: "WRITE_FIXED",
    OP_POLL_ADD: "POLL_ADD",
    OP_ASYNC_CANCEL: "ASYNC_CANCEL",
    OP_READ: "READ",
    OP_WRITE: "WRITE",
    OP_READ_MULTISHOT: "READ_MULTISHOT",
}

SETUP_SQPOLL = 1 << 1
SETUP_COOP_TASKRUN = 1 << 8
SETUP_SINGLE_ISSUER = 1 << 12
CQE_F_BUFFER = 1 << 0
CQE_F_MORE = 1 << 1
CQE_BUFFER_SHIFT = 16
IOSQE_FIXED_FILE = 1 << 0

EBUSY = 16
#: the system page size (mincore's unit)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def oserror(rc: int, what: str) -> OSError:
    """OSError for a -errno return (Python picks the subclass from errno)."""
    return OSError(-rc, f"{what}: {os.strerror(-rc)}")


def check(rc: int, what: str) -> int:
    if rc < 0:
        raise oserror(rc, what)
    return rc


# ---- buffers ---------------------------------------------------------


class BasePin:
    """Keeps a memoryview's memory in place through an export of the object *under* it
    (see :func:`buffer_address`); ``len()`` is the view's size in bytes."""

    __slots__ = ("_base", "_n")

    def __init__(self, base: object, n: int) -> None:
        self._base = base
        self._n = n

    def __len__(self) -> int:
        return self._n


def buffer_address(buf: ReadableBuffer, *, writable: bool = False) -> tuple[int, Sized]:
    """Address of a buffer-protocol object, plus a handle that keeps it pinned (its
    ``len()`` is the buffer's size in bytes).

    The pin is never an export of a ``memoryview``: CPython before 3.12.7 crashes when
    the cyclic GC clears a memoryview that still has an exported buffer (gh-77894:
    ``memory_clear`` fails with "memoryview has 1 exported buffer", drops the view's
    managed buffer anyway, and the view's deallocation then dereferences NULL).  A pin
    only has to be caught in a reference cycle with its view for that to happen, e.g.
    by the traceback of an exception raised while it was held (a ``RangeGone`` from a
    COPY, kept by the failed handler task) -- the old server's SIGSEGV at exit after a
    takeover.  So a memoryview is pinned through the object it views (a bytearray, an
    mmap, bytes, an array...), which the GC never clears while exported; only when that
    is not possible (no such object, or memory outside it) is the view itself pinned.
    """
    cbuf = ffi.from_buffer(buf, require_writable=writable)
    addr = int(ffi.cast("uintptr_t", cbuf))
    if isinstance(buf, memoryview):
        n = len(cbuf)
        base = _pin_base(buf.obj, addr, n, writable)
        if base is not None:
            ffi.release(cbuf)  # the export of the view ends here, not at the GC's mercy
            return addr, BasePin(base, n)
    return addr, cbuf


def _pin_base(obj: object, addr: int, n: int, writable: bool) -> CData | None:
    """An export of ``obj`` (or of what it views, if it is a memoryview too) covering
    [addr, addr+n), or None."""
    for _ in range(8):
        if not isinstance(obj, memoryview):
            break
        try:
            obj = obj.obj
        except ValueError:  # released
            return None
    if obj is None or isinstance(obj, memoryview):
        return None
    try:
        base = ffi.from_buffer(obj, require_writable=writable)
    except (TypeError, ValueError, BufferError):
        return None
    start = int(ffi.cast("uintptr_t", base))
    if start <= addr and addr + n <= start + len(base):
        pinned: CData = base
        return pinned
    ffi.release(base)  # an exporter that hands out other memory each time
    return None


def read_memory(addr: int, length: int) -> bytes:
    """Copy ``length`` bytes at ``addr`` (GIL released during the copy)."""
    out = bytearray(length)
    dst, keep = buffer_address(out, writable=True)
    lib.ua_memcpy(dst, addr, length)
    del keep
    return bytes(out)


def write_memory(addr: int, data: ReadableBuffer) -> None:
    src, keep = buffer_address(data)
    lib.ua_memcpy(addr, src, len(keep))


# ---- io_uring --------------------------------------------------------


class RingHandle:
    """Owns one ``struct io_uring`` (via the C shim); methods map 1:1 to C calls."""

    __slots__ = ("_fl", "_r", "_res", "_ud", "batch", "fd", "features", "flags")

    def __init__(self, entries: int, flags: int, sq_thread_idle_ms: int = 0, batch: int = 256):
        err = ffi.new("int *")
        out_flags = ffi.new("uint32_t *")
        out_features = ffi.new("uint32_t *")
        r = lib.ua_ring_new(entries, flags, sq_thread_idle_ms, err, out_flags, out_features)
        if r == ffi.NULL:
            raise oserror(err[0], f"io_uring_queue_init(entries={entries}, flags={flags:#x})")
        self._r = r
        self.fd: int = lib.ua_ring_fd(r)
        self.flags: int = out_flags[0]
        self.features: int = out_features[0]
        self.batch = batch
        self._ud = ffi.new("uint64_t[]", batch)
        self._res = ffi.new("int32_t[]", batch)
        self._fl = ffi.new("uint32_t[]", batch)

    def close(self) -> None:
        if self._r is not None:
            lib.ua_ring_free(self._r)
            self._r = None

    def probe(self, nops: int = 64) -> list[bool]:
        out = ffi.new("uint8_t[]", nops)
        check(lib.ua_ring_probe(self._r, out, nops), "io_uring probe")
        return [bool(out[i]) for i in range(nops)]

    def sq_space(self) -> int:
        return int(lib.ua_ring_sq_space(self._r))

    def sq_ready(self) -> int:
        """SQEs prepared and not submitted (a native engine's included)."""
        return int(lib.ua_ring_sq_ready(self._r))

    def engine_flags(self) -> int:
        """Read and clear the native engines' flags (bit 0: messages queued for Python)."""
        return int(lib.ua_ring_engine_flags(self._r))

    @property
    def native(self) -> CData:
        """The ``struct ua_ring *`` (for the native engine); None once closed."""
        return self._r

    def submit(self) -> int:
        return check(lib.ua_ring_submit(self._r), "io_uring_submit")

    # prep_* return False when the SQ is full (caller submits and retries)
    def prep_rw(
        self, op: int, fd: int, addr: int, length: int, offset: int, ud: int,
        sqe_flags: int = 0, buf_index: int = -1,
    ) -> bool:
        rc: int = lib.ua_prep_rw(self._r, op, fd, addr, length, offset & 0xFFFFFFFFFFFFFFFF,
                                 ud, sqe_flags, buf_index)
        return rc == 0

    def prep_read_multishot(self, fd: int, length: int, offset: int, group: int, ud: int) -> bool:
        rc: int = lib.ua_prep_read_multishot(self._r, fd, length, offset & 0xFFFFFFFFFFFFFFFF,
                                             group, ud)
        return rc == 0

    def prep_poll(self, fd: int, mask: int, ud: int) -> bool:
        rc: int = lib.ua_prep_poll(self._r, fd, mask, ud)
        return rc == 0

    def prep_cancel(self, target: int, ud: int) -> bool:
        rc: int = lib.ua_prep_cancel(self._r, target, ud)
        return rc == 0

    def prep_nop(self, ud: int) -> bool:
        rc: int = lib.ua_prep_nop(self._r, ud)
        return rc == 0

    def reap(self) -> list[tuple[int, int, int]]:
        """Up to ``batch`` completions as (user_data, res, flags), in completion order."""
        n = lib.ua_reap(self._r, self._ud, self._res, self._fl, self.batch)
        if not n:
            return []
        ud, res, fl = self._ud, self._res, self._fl
        return [(ud[i], res[i], fl[i]) for i in range(n)]

    def register_buffers(self, addrs: Sequence[int], lens: Sequence[int]) -> None:
        check(lib.ua_register_buffers(self._r, list(addrs), list(lens), len(addrs)),
              "io_uring_register_buffers")

    def unregister_buffers(self) -> None:
        check(lib.ua_unregister_buffers(self._r), "io_uring_unregister_buffers")

    def register_files(self, fds: Sequence[int]) -> None:
        check(lib.ua_register_files(self._r, list(fds), len(fds)), "io_uring_register_files")

    def unregister_files(self) -> None:
        check(lib.ua_unregister_files(self._r), "io_uring_unregister_files")

    def bufring_new(self, group: int, nbufs: int, size: int) -> BufRing:
        return BufRing(self, group, nbufs, size)


class BufRing:
    """A provided-buffer ring (for multishot reads): ``nbufs`` buffers of ``size`` bytes."""

    __slots__ = ("_b", "_ring", "group", "nbufs", "size")

    def __init__(self, ring: RingHandle, group: int, nbufs: int, size: int):
        err = ffi.new("int *")
        b = lib.ua_bufring_new(ring._r, group, nbufs, size, err)
        if b == ffi.NULL:
            raise oserror(err[0], f"io_uring_register_buf_ring(group={group}, n={nbufs})")
        self._b, self._ring = b, ring
        self.group, self.nbufs, self.size = group, nbufs, size

    def view(self, bid: int, length: int) -> bytes:
        return bytes(ffi.buffer(ffi.cast("char *", lib.ua_bufring_addr(self._b, bid)), length))

    def recycle(self, bid: int) -> None:
        lib.ua_bufring_recycle(self._b, bid)

    def close(self) -> None:
        if self._b is not None:
            lib.ua_bufring_free(self._ring._r if self._ring._r is not None else ffi.NULL, self._b)
            self._b = None


# ---- userfaultfd -----------------------------------------------------


def uffd_open(flags: int) -> tuple[int, bool]:
    """(fd, opened_via_/dev/userfaultfd)."""
    via = ffi.new("int *")
    fd = lib.ua_uffd_open(flags, via)
    if fd < 0:
        raise oserror(fd, "userfaultfd open (/dev/userfaultfd and userfaultfd(2))")
    return fd, bool(via[0])


def uffd_api(fd: int, features: int) -> tuple[int, int, int]:
    """(rc, features, ioctls): rc is 0 or -errno, left to the caller to explain."""
    f = ffi.new("uint64_t *")
    i = ffi.new("uint64_t *")
    rc = lib.ua_uffd_api(fd, features, f, i)
    return rc, int(f[0]), int(i[0])


def uffd_register(fd: int, start: int, length: int, mode: int) -> int:
    i = ffi.new("uint64_t *")
    check(lib.ua_uffd_register(fd, start, length, mode, i),
          f"UFFDIO_REGISTER {start:#x}+{length:#x} mode={mode}")
    return int(i[0])


def uffd_unregister(fd: int, start: int, length: int) -> None:
    check(lib.ua_uffd_unregister(fd, start, length), f"UFFDIO_UNREGISTER {start:#x}+{length:#x}")


def uffd_wake(fd: int, start: int, length: int) -> int:
    return int(lib.ua_uffd_wake(fd, start, length))


def uffd_copy(fd: int, dst: int, src: int, length: int, mode: int) -> tuple[int, int]:
    """(rc, bytes done) for UFFDIO_COPY; rc 0 or -errno."""
    d = ffi.new("int64_t *")
    rc = lib.ua_uffd_copy(fd, dst, src, length, mode, d)
    return rc, int(d[0])


def uffd_copy_buf(fd: int, dst: int, buf: ReadableBuffer, length: int, mode: int) -> int:
    """One UFFDIO_COPY from the bytes-like ``buf`` (its first ``length`` bytes); 0 or
    -errno, not the bytes done.  The fault path's call: no cffi allocation per call (the
    buffer handle goes straight to C; ``ua_uffd_copy_buf``).  Callers on the hot path
    bind :data:`copy_buf` and :data:`from_buffer` themselves, as this does."""
    return int(copy_buf(fd, dst, from_buffer(buf), length, mode))


#: the fault path's UFFDIO_COPY, bound once: ``copy_buf(fd, dst, from_buffer(data), length,
#: mode)`` is 0 or -errno (:func:`uffd_copy_buf` without the Python frame)
copy_buf: Callable[[int, int, CData, int, int], int] = lib.ua_uffd_copy_buf
#: ``ffi.from_buffer``: the handle that passes a bytes-like object to C (TypeError otherwise)
from_buffer: Callable[[object], CData] = ffi.from_buffer


def uffd_copy_runs(fd: int, runs: ReadableBuffer, page_size: int
                   ) -> tuple[int, tuple[int, ...]]:
    """UFFDIO_COPY of every (dst, src, len) triple of ``runs`` (an ``array('Q')``) in one
    native call: ``(rc, (placed, already_there, left, ioctls, stopped_at))`` in pages, rc
    the number of runs or the -errno that stopped the batch at run ``stopped_at``."""
    out = ffi.new("uint64_t[5]")
    view = memoryview(runs).cast("B").cast("Q")
    rc = lib.ua_uffd_copy_runs(fd, ffi.from_buffer("uint64_t[]", runs), len(view) // 3,
                               page_size, out)
    return rc, tuple(int(x) for x in out)


def uffd_copy_pages(fd: int, dst: int, src: int, page_size: int, pages: ReadableBuffer
                    ) -> tuple[int, tuple[int, ...]]:
    """UFFDIO_COPY of the sorted page indexes ``pages`` (an ``array('I')``) from
    ``src + p * page_size`` to ``dst + p * page_size``, consecutive pages as one run, in
    one native call; results as :func:`uffd_copy_runs` (``stopped_at`` indexes pages)."""
    out = ffi.new("uint64_t[5]")
    n = memoryview(pages).nbytes // 4
    rc = lib.ua_uffd_copy_pages(fd, dst, src, page_size, ffi.from_buffer("uint32_t[]", pages),
                                n, out)
    return rc, tuple(int(x) for x in out)


def uffd_zeropage(fd: int, start: int, length: int, mode: int) -> tuple[int, int]:
    d = ffi.new("int64_t *")
    rc = lib.ua_uffd_zeropage(fd, start, length, mode, d)
    return rc, int(d[0])


def uffd_continue(fd: int, start: int, length: int, mode: int) -> tuple[int, int]:
    d = ffi.new("int64_t *")
    rc = lib.ua_uffd_continue(fd, start, length, mode, d)
    return rc, int(d[0])


def uffd_poison(fd: int, start: int, length: int, mode: int) -> tuple[int, int]:
    d = ffi.new("int64_t *")
    rc = lib.ua_uffd_poison(fd, start, length, mode, d)
    return rc, int(d[0])


def uffd_move(fd: int, dst: int, src: int, length: int, mode: int) -> tuple[int, int]:
    d = ffi.new("int64_t *")
    rc = lib.ua_uffd_move(fd, dst, src, length, mode, d)
    return rc, int(d[0])


def uffd_writeprotect(fd: int, start: int, length: int, mode: int) -> int:
    return int(lib.ua_uffd_writeprotect(fd, start, length, mode))


def pwrite(fd: int, src: int, length: int, pos: int) -> tuple[int, int]:
    d = ffi.new("int64_t *")
    rc = lib.ua_pwrite(fd, src, length, pos, d)
    return rc, int(d[0])


def uffd_write_fd(fd: int, flags: int) -> int:
    """UFFDIO_WRITE_FD (patched kernels): a new O_RDWR fd for the same uffd context.

    ``flags``: 0 or ``os.O_CLOEXEC | os.O_NONBLOCK``.  Raises OSError
    (EINVAL on a stock kernel, which does not know the ioctl).
    """
    return check(lib.ua_uffd_write_fd(fd, flags), "UFFDIO_WRITE_FD")


def uffd_poll(fd: int, budget_ns: int) -> int:
    """UFFDIO_POLL (patched kernels): set the fault spin budget (0 = off); the old budget."""
    old = ffi.new("uint64_t *")
    check(lib.ua_uffd_poll(fd, budget_ns, old), f"UFFDIO_POLL budget_ns={budget_ns}")
    return int(old[0])


# ---- memory ----------------------------------------------------------

PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED, MADV_REMOVE = 4, 9


def mmap(length: int, prot: int = PROT_READ | PROT_WRITE,
         flags: int = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, fd: int = -1, offset: int = 0,
         addr: int = 0) -> int:
    return check(lib.ua_mmap(addr, length, prot, flags, fd, offset), f"mmap({length:#x})")


def munmap(addr: int, length: int) -> None:
    check(lib.ua_munmap(addr, length), f"munmap({addr:#x}, {length:#x})")


def mremap(old: int, old_len: int, new_len: int, flags: int = MREMAP_MAYMOVE,
           new_addr: int = 0) -> int:
    return check(lib.ua_mremap(old, old_len, new_len, flags, new_addr), f"mremap({old:#x})")


def madvise(addr: int, length: int, advice: int) -> None:
    check(lib.ua_madvise(addr, length, advice), f"madvise({addr:#x}, {length:#x}, {advice})")


def mincore(addr: int, length: int) -> bytes:
    """mincore(2) of ``[addr, addr+length)`` (a page-aligned file mapping): one byte per
    (system) page, bit 0 set when the page is in the page cache.  Never blocks, never faults
    the mapping in.  (Files one neither owns nor may write read as all resident, Linux 5.0+.)"""
    n = (length + PAGE_SIZE - 1) // PAGE_SIZE
    vec = ffi.new("unsigned char[]", max(n, 1))
    check(lib.ua_mincore(addr, length, vec), f"mincore({addr:#x}, {length:#x})")
    return bytes(ffi.buffer(vec, n))


def mprotect(addr: int, length: int, prot: int) -> None:
    check(lib.ua_mprotect(addr, length, prot), f"mprotect({addr:#x}, {length:#x}, {prot})")
