"""Bits shared by the benchmark processes: loops, pinning, quiet logging, percentiles."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

import structlog

LOOPS = ("asyncio", "uvloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown loop {name!r} (asyncio or uvloop)")


def pin(cpu: int | None) -> None:
    """Pin the calling thread (and the threads it creates later) to ``cpu``."""
    if cpu is not None and cpu >= 0:
        os.sched_setaffinity(0, {cpu})


def affinity() -> str:
    """This thread's CPU list, as the C programs print it ("0-1", "0")."""
    cpus = sorted(os.sched_getaffinity(0))
    out: list[str] = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def quiet_logging() -> None:
    """A benchmark process is an application: keep structlog to warnings on stderr."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=open(2, "w", closefd=False)),  # noqa: SIM115
        cache_logger_on_first_use=True,
    )


def percentiles(values_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/mean/max in microseconds, nearest-rank like benchmarks/c/touch.c."""
    if not values_ns:
        return {"p50_us": 0.0, "p90_us": 0.0, "p99_us": 0.0, "mean_us": 0.0, "max_us": 0.0}
    v = sorted(values_ns)
    n = len(v)

    def q(p: float) -> float:
        return v[min(n - 1, int(p * n))] / 1e3

    return {"p50_us": q(0.50), "p90_us": q(0.90), "p99_us": q(0.99),
            "mean_us": sum(v) / n / 1e3, "max_us": v[-1] / 1e3}
