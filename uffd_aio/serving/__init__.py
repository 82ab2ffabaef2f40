"""Serving a region from a page store: the policies between a fault and :mod:`uffd_aio.stores`.

* :mod:`~uffd_aio.serving.attach`: ``attach(region, store)`` makes a store a region's fault
  handler (in-flight dedup, read-ahead windows, recording and replay of fault order);
* :mod:`~uffd_aio.serving.readahead`: the read-ahead policies (pure), the fault-order trace
  format, ``FaultRecorder`` and ``ReplayPlan``;
* :mod:`~uffd_aio.serving.dirty`: write-protect dirty tracking and eviction under a budget;
* :mod:`~uffd_aio.serving.setreplay`: the working-set installer (``uffd-aio serve --replay SET``).

Stores know nothing about userfaultfd; this package is what ties them to one.
"""

from __future__ import annotations

from uffd_aio.serving.attach import Attachment, AttachStats, attach

__all__ = ["AttachStats", "Attachment", "attach"]
