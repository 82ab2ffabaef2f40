"""Pager statistics: counters and a log2 latency histogram (pure)."""

from __future__ import annotations

import attrs

_NBUCKETS = 40  # bucket i holds latencies in [2**i, 2**(i+1)) ns; 2**40 ns ~ 18 min


@attrs.define(eq=False)
class Histogram:
    """Log2-bucketed latency histogram in nanoseconds (cheap to record on the fault path)."""

    buckets: list[int] = attrs.Factory(lambda: [0] * _NBUCKETS)
    count: int = 0
    total_ns: int = 0
    max_ns: int = 0

    def record(self, ns: int) -> None:
        i = ns.bit_length() - 1 if ns > 0 else 0
        self.buckets[i if i < _NBUCKETS else _NBUCKETS - 1] += 1
        self.count += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns

    def percentile(self, q: float) -> float:
        """Approximate q-th percentile (0..100) in ns: geometric middle of the bucket."""
        if not self.count:
            return 0.0
        target = max(1, round(self.count * q / 100.0))
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= target:
                return float(2**i) * 1.4142135623730951
        return float(self.max_ns)

    def snapshot(self) -> LatencySnapshot:
        mean = self.total_ns / self.count if self.count else 0.0
        return LatencySnapshot(
            count=self.count,
            mean_us=mean / 1e3,
            p50_us=self.percentile(50) / 1e3,
            p90_us=self.percentile(90) / 1e3,
            p99_us=self.percentile(99) / 1e3,
            max_us=self.max_ns / 1e3,
            buckets=tuple(self.buckets),
        )


@attrs.frozen
class LatencySnapshot:
    count: int
    mean_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    buckets: tuple[int, ...]


@attrs.define(eq=False)
class Counters:
    """Mutable counters owned by one Pager; read them through :meth:`snapshot`."""

    faults: int = 0
    duplicate_faults: int = 0
    handler_calls: int = 0
    resolved_pages: int = 0
    resolved_bytes: int = 0
    copies: int = 0
    zeropages: int = 0
    continues: int = 0
    unprotects: int = 0
    poisons: int = 0
    moves: int = 0
    wakes: int = 0
    ring_writes: int = 0
    pwrites: int = 0
    ioctls: int = 0
    eagain_retries: int = 0
    errors: int = 0
    timeouts: int = 0
    events: int = 0
    forks: int = 0
    forks_released: int = 0
    remaps: int = 0
    removes: int = 0
    unmaps: int = 0
    reads: int = 0
    latency: Histogram = attrs.Factory(Histogram)

    def snapshot(self, *, inflight: int, backlog: int, backend: str) -> PagerStats:
        fields = {a.name: getattr(self, a.name) for a in attrs.fields(Counters)
                  if a.name != "latency"}
        return PagerStats(**fields, inflight=inflight, backlog=backlog, backend=backend,
                          latency=self.latency.snapshot())


@attrs.frozen
class PagerStats:
    """A point-in-time copy of a pager's counters (``pager.stats``)."""

    faults: int
    duplicate_faults: int
    handler_calls: int
    resolved_pages: int
    resolved_bytes: int
    copies: int
    zeropages: int
    continues: int
    unprotects: int
    poisons: int
    wakes: int
    ring_writes: int
    pwrites: int
    ioctls: int
    eagain_retries: int
    errors: int
    timeouts: int
    events: int
    forks: int
    #: fork children released after their address space went away (exit, exec)
    forks_released: int
    remaps: int
    removes: int
    unmaps: int
    reads: int
    inflight: int
    backlog: int
    backend: str
    latency: LatencySnapshot
    #: faults seen by Python (handlers, policies); ``faults`` = python + native
    python_faults: int = attrs.field(default=0, kw_only=True)
    #: native engine (``region.serve_from``): faults it resolved in C, pages it placed
    #: (read-ahead included), EEXIST wakes, file pages not cached (passed up), messages
    #: it passed up to Python, its own read(2) calls, its ioctls
    native_faults: int = attrs.field(default=0, kw_only=True)
    native_pages: int = attrs.field(default=0, kw_only=True)
    native_readahead_pages: int = attrs.field(default=0, kw_only=True)
    native_wakes: int = attrs.field(default=0, kw_only=True)
    native_cache_misses: int = attrs.field(default=0, kw_only=True)
    native_passed_up: int = attrs.field(default=0, kw_only=True)
    native_reads: int = attrs.field(default=0, kw_only=True)
    native_ioctls: int = attrs.field(default=0, kw_only=True)
    #: phase 2: io_uring READs of page-cache misses (and their pages), faults that
    #: waited for one in flight, faults passed up after a failed/short READ
    native_cache_reads: int = attrs.field(default=0, kw_only=True)
    native_cache_read_pages: int = attrs.field(default=0, kw_only=True)
    native_read_waits: int = attrs.field(default=0, kw_only=True)
    native_read_passed_up: int = attrs.field(default=0, kw_only=True)
    #: io_uring WRITEs on the uffd (patched kernel) and pwrites finishing short ones
    native_ring_writes: int = attrs.field(default=0, kw_only=True)
    native_pwrites: int = attrs.field(default=0, kw_only=True)
    #: UFFDIO_MOVEs done (``ev.move()``, handlers returning ``uffd_aio.Moved``)
    moves: int = attrs.field(default=0, kw_only=True)
