"""The kernel binding: the C of the product and the thin typed layer over it.

Layers (pynacl's): ``csrc/`` (liburing calls and the uffd ioctls in ``native.c``, the
native fault engine in ``engine.c``, the stall watchdog in ``watchdog.c``) is compiled
by cffi (API mode, at ``pip install``) into ``_native``; :mod:`.lowlevel`,
:mod:`.engine` and :mod:`.watchdog` are the only modules that touch its ``ffi``/``lib``:
they turn ``-errno`` into :class:`OSError` and hand back plain ints, tuples and small
records.  Everything above (:mod:`uffd_aio.ring`, :mod:`uffd_aio.uffd`, the pager)
uses those wrappers, never ``ffi``.
"""
