"""``uffd-aio bench``: uffd_aio against the C reference handler (benchmarks/c), side by side.

* :mod:`uffd_aio.bench.cli` runs the interleaved rounds and writes the JSON, tables and plots.
* :mod:`uffd_aio.bench.serve` is the Python contender of the handoff runs: a process that
  receives uffds from ``benchmarks/c/build/workload`` and serves them with a :class:`Pager`.
* :mod:`uffd_aio.bench.inproc` is the Python contender of the in-process runs.
* :mod:`uffd_aio.bench.store` is the fault handler both use (same content and read-ahead
  policy as the C handler).
* :mod:`uffd_aio.bench.report` turns results into medians, ratio tables, markdown and PNGs.
"""
