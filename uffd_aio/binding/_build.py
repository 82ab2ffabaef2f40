"""cffi builder (API mode, out of line) for uffd_aio.binding._native.

Built at install time by setuptools (``cffi_modules`` in setup.py) against
the system liburing (Debian ``liburing-dev`` >= 2.3).  The declarations live
in ``csrc/native.h`` and the code in ``csrc/native.c`` so that both can be
read and compiled as ordinary C.
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

_HERE = pathlib.Path(__file__).resolve().parent
_CSRC = _HERE / "csrc"

ffibuilder = FFI()
ffibuilder.cdef((_CSRC / "native.h").read_text())
ffibuilder.cdef((_CSRC / "watchdog.h").read_text())
ffibuilder.cdef((_CSRC / "engine.h").read_text())
ffibuilder.set_source(
    "uffd_aio.binding._native",
    (_CSRC / "native.c").read_text() + '\n#include "watchdog.h"\n#include "engine.h"\n',
    # setuptools wants source paths relative to the project root (its cwd)
    sources=[os.path.relpath(_CSRC / "watchdog.c"), os.path.relpath(_CSRC / "engine.c")],
    include_dirs=[str(_CSRC)],
    libraries=["uring", "pthread"],
    # UA_CFLAGS: extra flags (scripts/asan.sh builds with -fsanitize=address)
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
                        *os.environ.get("UA_CFLAGS", "").split()],
    extra_link_args=os.environ.get("UA_LDFLAGS", "").split(),
    define_macros=[("_GNU_SOURCE", "1")],
)

if __name__ == "__main__":  # pragma: no cover - manual build
    ffibuilder.compile(verbose=True)
