"""Buffer pins (``ll.buffer_address``) and the cyclic garbage collector.

CPython before 3.12.7 (gh-77894) crashes when the GC clears a ``memoryview`` that still
has an exported buffer: ``memory_clear`` fails ("Exception ignored in tp_clear of
<class 'memoryview'>: BufferError: memoryview has 1 exported buffer"), drops the view's
managed buffer anyway, and the view's deallocation, once the export is released,
dereferences NULL.  A cffi ``from_buffer`` of a memoryview is such an export.  That was
the old server's SIGSEGV at exit after ``serve --takeover`` (test_crash_recovery.py): a
COPY whose fault handler's memoryview was pinned in ``IoctlExecutor.execute`` raised
``RangeGone``; the handler task kept the exception, its traceback the frame, and the
pin; the final collection broke that cycle.  Pins now hold the object under the view.

Each case runs in a child process (the bug kills the process) and is checked for the
crash and for the tp_clear warning that precedes it.
"""

from __future__ import annotations

import mmap
import pickle
import subprocess
import sys
from array import array
from typing import Any

import pytest

from tests.limits import limit
from uffd_aio.binding import lowlevel as ll
from uffd_aio.resolve import IoctlExecutor, Kind, Op
from uffd_aio.uffd import RangeGone, Userfaultfd

pytestmark = pytest.mark.timeout(60)
PS = 4096

# a pin held by a frame that an exception's traceback keeps, the exception in a cycle:
# only the cyclic GC frees it (in this order, a memoryview export crashes 3.11 at once)
_PIN_IN_A_CYCLE = r"""
import gc
from uffd_aio.binding import lowlevel as ll

class Holder:
    pass

def pin_and_fail(view):
    addr, keep = ll.buffer_address(view, writable=WRITABLE)
    raise OSError(3, "gone")

def resolve(data):
    view = memoryview(data).cast("B")[64:4096]
    pin_and_fail(view)

for _ in range(50):
    try:
        resolve(bytearray(4096))
    except OSError as exc:
        h = Holder()
        h.exc, exc.holder = exc, h
    h = None
gc.collect()
print("survived")
"""

def _run(code: str) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=limit(30))
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("writable", [False, True])
def test_a_pinned_memoryview_caught_in_a_cycle_is_collected(writable: bool) -> None:
    rc, out, err = _run(f"WRITABLE = {writable}\n" + _PIN_IN_A_CYCLE)
    assert "tp_clear" not in err, err
    assert rc == 0 and "survived" in out, (rc, out, err)


def test_a_failed_copy_leaves_no_export_of_the_fault_handlers_view() -> None:
    """The real path: IoctlExecutor's COPY of a handler's memoryview fails with RangeGone
    (ENOENT: nothing is registered there).  The exception's traceback keeps the frame
    that pinned the view; that pin must not be an export of the view (else the GC may
    clear the view while exported, when it breaks the cycle the exception is in)."""
    uffd = Userfaultfd.open()
    dst = ll.mmap(PS)
    try:
        view = memoryview(bytearray(PS)).cast("B")
        with pytest.raises(RangeGone) as caught:
            IoctlExecutor().execute(uffd, Op(Kind.COPY, dst, PS, view))
        assert caught.value.__traceback__ is not None  # the frames, and their locals
        view.release()  # BufferError "memoryview has 1 exported buffer" before the fix
    finally:
        ll.munmap(dst, PS)
        uffd.close()


def _addr(buf: Any) -> int:
    addr, keep = ll.buffer_address(buf)
    del keep
    return addr


@pytest.mark.parametrize("kind", ["bytearray", "bytes", "mmap", "array"])
def test_a_memoryview_pin_covers_the_view_and_holds_its_base(kind: str) -> None:
    base: Any = {"bytearray": lambda: bytearray(8192), "bytes": lambda: bytes(8192),
                 "mmap": lambda: mmap.mmap(-1, 8192),
                 "array": lambda: array("Q", bytes(8192))}[kind]()
    view = memoryview(base).cast("B")[100:4196]
    addr, keep = ll.buffer_address(view)
    assert len(keep) == 4096
    assert addr == _addr(base) + 100
    assert isinstance(keep, ll.BasePin)
    if kind == "bytearray":
        with pytest.raises(BufferError):  # the pin holds the bytearray itself
            base.extend(b"x")
        view.release()  # the view may go: the pin still holds its memory
        with pytest.raises(BufferError):
            base.extend(b"x")
        del keep
        base.extend(b"x")
    elif kind == "mmap":
        view.release()
        with pytest.raises(BufferError):
            base.close()
        del keep
        base.close()


def test_a_view_of_a_view_exported_by_another_object_is_pinned_at_the_bottom() -> None:
    base = bytearray(8192)
    outer = memoryview(pickle.PickleBuffer(memoryview(base)[4096:]))  # .obj: a memoryview
    assert isinstance(outer.obj, memoryview)
    addr, keep = ll.buffer_address(outer)
    assert isinstance(keep, ll.BasePin) and len(keep) == 4096
    assert addr == _addr(base) + 4096


def test_pins_of_other_buffers_are_plain_exports() -> None:
    buf = bytearray(4096)
    _, keep = ll.buffer_address(buf, writable=True)
    assert len(keep) == 4096 and not isinstance(keep, ll.BasePin)
    with pytest.raises(BufferError):  # a read-only view is refused for writing, as before
        ll.buffer_address(memoryview(bytes(16)), writable=True)
