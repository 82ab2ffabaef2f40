"""cffi builder (API mode, out of line) for uffd_aio.testing._helpers.

The native helpers of tests, examples and benchmarks (the pattern, scan and
stamp threads, ``fork_touch``, SIGBUS-catching reads, ``malloc_churn``), built
as their own extension so that none of them is compiled into the product's
``uffd_aio.binding._native``.  Built at install time by setuptools
(``cffi_modules`` in setup.py); the declarations live in ``csrc/helpers.h``
and the code in ``csrc/helpers.c``.
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

_HERE = pathlib.Path(__file__).resolve().parent
_CSRC = _HERE / "csrc"

ffibuilder = FFI()
ffibuilder.cdef((_CSRC / "helpers.h").read_text())
ffibuilder.set_source(
    "uffd_aio.testing._helpers",
    '#include <stdint.h>\n#include "helpers.h"\n',
    # setuptools wants source paths relative to the project root (its cwd)
    sources=[os.path.relpath(_CSRC / "helpers.c")],
    include_dirs=[str(_CSRC)],
    libraries=["pthread"],
    # UA_CFLAGS: extra flags (scripts/asan.sh builds with -fsanitize=address)
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror",
                        *os.environ.get("UA_CFLAGS", "").split()],
    extra_link_args=os.environ.get("UA_LDFLAGS", "").split(),
    define_macros=[("_GNU_SOURCE", "1")],
)

if __name__ == "__main__":  # pragma: no cover - manual build
    ffibuilder.compile(verbose=True)
