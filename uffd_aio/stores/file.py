"""FileBackend: pages from a file, read with io_uring into registered buffers (``file:PATH``).

The snapshot-restore backend: a VM's memory file (Firecracker's
``mem_file``), read on demand.  No threads: every read is an io_uring
READ_FIXED on the running loop's shared :class:`~uffd_aio.ring.Ring` (the one
the server and its pagers use: one ``io_uring_enter`` submits and reaps for
all; ``ring=`` names another) into one of a pool of buffers registered with
that ring, then copied out (the copy is what the pager hands to UFFDIO_COPY;
the buffer goes back to the pool at once).

* Ranges past the end of the file read as zeros (``None`` when the whole
  range is past the end, so the pager maps zero pages).  The end is the size
  *announced at open*: ``st_size`` for a regular file, ``BLKGETSIZE64`` (or
  ``lseek(SEEK_END)``) for a block device, whose ``st_size`` is 0.  A read that
  comes back short *inside* that size (the file was truncated while served)
  is an error, logged as ``uffd_aio.file_short_read``: the pager's error policy
  applies (SIGBUS by default), never silent zeros.
* Read-only by default: snapshot files are shared by every VM restored from
  them and must never change, so :meth:`store` raises
  :class:`~uffd_aio.stores.base.BackendError`.  ``FileBackend.open(path,
  writable=True)`` opens the file read-write and :meth:`store` writes pages
  back with io_uring (for a private copy of the memory, e.g. as an eviction
  target).
* The pool bounds the reads in flight (``buffers``); a fetch longer than one
  buffer (read-ahead) is read as several buffer-sized pieces in parallel.
* If the kernel refuses to register the buffers (RLIMIT_MEMLOCK), or the ring
  already has a table (a ring has one: another store registered first), the
  same pool is used with plain io_uring READs, and a warning says so.
* ``nowait=True`` (SPEC ``file:PATH?nowait``) first tries ``preadv2(RWF_NOWAIT)``
  straight into the result: it only copies what the page cache already holds
  and never blocks (EAGAIN otherwise), so a cached snapshot is served without
  an io_uring round trip -- and, the handler then never suspending, without a
  Task per fault.  Whatever is not cached goes through io_uring as above.
  Off by default: it trades the io_uring-only I/O path for speed on cached
  files (measured in docs/handoff.md).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import mmap
import os
import stat
import struct

from uffd_aio.log import get_logger
from uffd_aio.ring import Ring
from uffd_aio.stores.base import BackendError, Buffer

PAGE = mmap.PAGESIZE
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)


def file_size(fd: int) -> int:
    """Bytes readable from ``fd``: ``st_size``, or a block device's size (``st_size`` 0)."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("@Q", buf)[0])
    except OSError:
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.lseek(fd, pos, os.SEEK_SET)


def _split_options(p: str) -> tuple[str, set[str]]:
    base, sep, query = p.rpartition("?")
    if not sep or os.path.exists(p):
        return p, set()
    opts = set(query.split("&"))
    unknown = opts - {"nowait"}
    if unknown:
        raise BackendError(f"unknown file backend option(s) {sorted(unknown)} in {p!r}: "
                           "the only one is 'nowait'")
    return base, opts


class FileBackend:
    """Pages of a file; see the module docstring.  Create with :meth:`open` on the loop."""

    def __init__(self, path: str, fd: int, size: int, ring: Ring, pool: mmap.mmap,
                 buffers: int, buffer_size: int, *, writable: bool, fixed: bool,
                 nowait: bool = False) -> None:
        self.path = path
        self.name = (f"file:{path}" + ("?nowait" if nowait else "")
                     + (" (rw)" if writable else ""))
        self.nowait = nowait
        self.nowait_bytes = 0
        self.size = size
        self.writable = writable
        self.fixed = fixed
        self.buffer_size = buffer_size
        self.reads = 0
        self.bytes_read = 0
        self._fd = fd
        self._ring = ring
        self._pool = pool
        self._views = [memoryview(pool)[i * buffer_size:(i + 1) * buffer_size]
                       for i in range(buffers)]
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(buffers):
            self._free.put_nowait(i)
        self._closed = False
        self._own_ring = False  # open() without ring=: a reference to the shared ring
        self._log = get_logger(component="file_backend", path=path)

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, writable: bool = False,
                   buffers: int = 16, buffer_size: int = 256 << 10,
                   nowait: bool | None = None, ring: Ring | None = None) -> FileBackend:
        """Open ``path`` and set up its buffer pool, registered with the ring.

        ``ring``: the io_uring to read with (the caller keeps it and closes it after
        this backend); by default the running loop's shared ring (:meth:`Ring.shared`).
        A string ``PATH?nowait`` (as in the SPEC ``file:PATH?nowait``) sets
        ``nowait`` when no file of that literal name exists.
        """
        if buffers < 1 or buffer_size < PAGE or buffer_size % PAGE:
            raise ValueError("need buffers >= 1 and buffer_size a multiple of the page size")
        p, opts = _split_options(os.fspath(path))
        if nowait is None:
            nowait = "nowait" in opts
        try:
            fd = os.open(p, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"cannot open the snapshot file {p!r}: {exc.strerror}") from exc
        own = ring is None
        try:
            size = file_size(fd)
            if ring is None:
                ring = Ring.shared(asyncio.get_running_loop())
            pool = mmap.mmap(-1, buffers * buffer_size)
            views = [memoryview(pool)[i * buffer_size:(i + 1) * buffer_size]
                     for i in range(buffers)]
            try:
                ring.register_buffers(views)
                fixed = True
            except OSError as exc:
                fixed = False
                get_logger(component="file_backend").warning(
                    "uffd_aio.fixed_buffers_unavailable", path=p, error=str(exc),
                    hint="the ring already has registered buffers (another store): "
                         "using plain io_uring reads" if exc.errno == errno.EBUSY else
                         "raise RLIMIT_MEMLOCK (ulimit -l) for registered buffers; "
                         "using plain io_uring reads")
            del views
        except BaseException:
            if own and ring is not None:
                ring.close()
            os.close(fd)
            raise
        backend = cls(p, fd, size, ring, pool, buffers, buffer_size, writable=writable,
                      fixed=fixed, nowait=bool(nowait))
        backend._own_ring = own
        return backend

    def fileno(self) -> int:
        """The file's descriptor (``region.serve_from(backend)`` maps it for the native
        engine; the backend keeps ownership)."""
        if self._closed:
            raise ValueError(f"{self.name} is closed")
        return self._fd

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise BackendError(f"{self.name} is closed")
        if offset < 0 or length <= 0:
            raise BackendError(f"bad range offset={offset} length={length}")

    async def _read_piece(self, off: int, n: int, out: bytearray, at: int) -> None:
        """Read file [off, off+n) into out[at:at+n] through a pool buffer."""
        idx = await self._free.get()
        done = 0
        try:
            while done < n:  # a short read is continued; 0 bytes is the end of the file
                m = n - done
                if self.fixed:
                    got = await self._ring.read_fixed(self._fd, idx, off + done, m)
                else:
                    got = await self._ring.read(self._fd, self._views[idx][:m], off + done)
                self.reads += 1
                if got <= 0:
                    break
                self.bytes_read += got
                out[at + done:at + done + got] = self._views[idx][:got]
                done += got
        except OSError as exc:
            raise BackendError(f"reading {self.path!r} at {off:#x}+{n:#x}: {exc}") from exc
        finally:
            self._free.put_nowait(idx)
        if done < n:
            self._short_read(off, n, done)

    def _short_read(self, off: int, expected: int, got: int) -> None:
        """The file ended inside the announced size (truncated while served): an error,
        so that the pager's policy applies, instead of zeros that look like data."""
        self._log.warning("uffd_aio.file_short_read", offset=off, expected=expected, got=got,
                          size=self.size)
        raise BackendError(
            f"short read from {self.path!r} at {off:#x}: {got} of {expected} bytes; the file "
            f"ends inside its announced size {self.size} (truncated while served?)")

    async def fetch(self, offset: int, length: int) -> Buffer | None:
        """``length`` bytes at ``offset``; zeros past the end of the file."""
        self._check(offset, length)
        if offset >= self.size:
            return None
        avail = min(length, self.size - offset)
        out = bytearray(length)
        if self.nowait:
            try:
                got = os.preadv(self._fd, [out], offset, os.RWF_NOWAIT)
            except BlockingIOError:  # not in the page cache: io_uring below
                got = 0
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise BackendError(f"reading {self.path!r} at {offset:#x}+{length:#x}: "
                                       f"{exc}") from exc
                # this filesystem has no RWF_NOWAIT (tmpfs before 6.x, 9p...): io_uring only
                self.nowait = False
                self._log.warning("uffd_aio.nowait_unsupported", error=str(exc))
                got = 0
            self.nowait_bytes += got
            if got >= avail:
                return out
            if got:  # part of it was cached: read the rest
                await self._read_rest(offset + got, avail - got, out, got)
                return out
        bs = self.buffer_size
        if avail <= bs:
            await self._read_piece(offset, avail, out, 0)
        else:
            await asyncio.gather(*(self._read_piece(offset + at, min(bs, avail - at), out, at)
                                   for at in range(0, avail, bs)))
        return out

    async def _read_rest(self, off: int, n: int, out: bytearray, at: int) -> None:
        bs = self.buffer_size
        await asyncio.gather(*(self._read_piece(off + k, min(bs, n - k), out, at + k)
                               for k in range(0, n, bs)))

    async def store(self, offset: int, data: Buffer) -> None:
        """Write ``data`` back at ``offset`` (only when opened ``writable=True``)."""
        view = memoryview(data).cast("B")
        self._check(offset, view.nbytes)
        if not self.writable:
            raise BackendError(f"{self.name} is read-only: snapshot files are never written "
                               "(open it with FileBackend.open(path, writable=True))")
        done = 0
        try:
            while done < view.nbytes:
                n = await self._ring.write(self._fd, view[done:], offset + done)
                if n <= 0:
                    raise BackendError(f"writing {self.path!r} at {offset + done:#x}: "
                                       "no progress")
                done += n
        except OSError as exc:
            raise BackendError(f"writing {self.path!r} at {offset + done:#x}: {exc}") from exc
        self.size = max(self.size, offset + view.nbytes)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.fixed:  # the ring may outlive this store: give its table back
            try:
                self._ring.unregister_buffers()
            except OSError as exc:
                self._log.warning("uffd_aio.unregister_buffers_failed", error=str(exc))
        if self._own_ring:
            self._ring.close()
        os.close(self._fd)
        for v in self._views:
            v.release()
        self._views = []
        try:
            self._pool.close()
        except BufferError:  # the ring's handles still pin it: freed with them
            pass

    def __repr__(self) -> str:
        return (f"FileBackend({self.path!r}, size={self.size}, writable={self.writable}, "
                f"fixed={self.fixed})")
