"""``uffd-aio doctor``: what this machine supports, and the reason for anything it doesn't.

Every line is probed, not assumed: the uffd features come from UFFDIO_API on
a throwaway uffd, the io_uring opcodes from IORING_REGISTER_PROBE on a real
ring, the liburing version from the library this process actually loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys

import attrs

from uffd_aio.binding import lowlevel as ll
from uffd_aio.modes import DEFAULT_FEATURES, PATCHED_FEATURES, Feature, feature_names


@attrs.frozen
class Check:
    """One probed fact: ``ok`` None means informational."""

    name: str
    value: str
    ok: bool | None = None
    reason: str = ""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def liburing_version() -> str:
    """Version of the liburing shared object mapped into this process (e.g. ``2.3``)."""
    maps = _read("/proc/self/maps") or ""
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if "liburing.so" in path:
            real = os.path.basename(os.path.realpath(path))
            m = re.search(r"liburing\.so\.(\d+(?:\.\d+)*)", real)
            return m.group(1) if m else real
    return "statically linked or not loaded"


def _uffd_checks() -> tuple[list[Check], Feature]:
    out: list[Check] = []
    dev = os.path.exists("/dev/userfaultfd")
    unpriv = _read("/proc/sys/vm/unprivileged_userfaultfd")
    out.append(Check("/dev/userfaultfd", "present" if dev else "missing", dev or None,
                     "" if dev else "falls back to userfaultfd(2) (needs CAP_SYS_PTRACE or "
                     "vm.unprivileged_userfaultfd=1 for non-root)"))
    out.append(Check("vm.unprivileged_userfaultfd", unpriv if unpriv is not None else "unknown"))
    try:
        fd, via_dev = ll.uffd_open(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        out.append(Check("userfaultfd", "unavailable", False, str(exc)))
        return out, Feature(0)
    try:
        rc, features, _ioctls = ll.uffd_api(fd, 0)
    finally:
        os.close(fd)
    if rc < 0:
        out.append(Check("UFFDIO_API", "failed", False, os.strerror(-rc)))
        return out, Feature(0)
    feats = Feature(features)
    out.append(Check("userfaultfd", "opened via " + ("/dev/userfaultfd" if via_dev
                                                      else "userfaultfd(2)"), True))
    out.append(Check("uffd features", " ".join(feature_names(features)) or "none", True))
    missing = Feature(int(DEFAULT_FEATURES) & ~features)
    out.append(Check("uffd features the pager would like", "all present" if not missing
                     else "missing: " + " ".join(feature_names(int(missing))),
                     not missing, "" if not missing else "older kernel: the pager works "
                     "without them, with fewer events/modes"))
    return out, feats


def _patched_checks(feats: Feature) -> list[Check]:
    out: list[Check] = []
    for feat, what in ((Feature.WRITE, "write interface (pwrite / io_uring WRITE resolves faults)"),
                       (Feature.POLL, "poll mode (faulting threads spin before sleeping)")):
        has = bool(feats & feat)
        out.append(Check(f"patched: {feat.name}", what if has else "absent", has,
                         "" if has else f"stock kernel {platform.release()}: the uffd_aio kernel "
                         "series is not applied (kernel_patches/; `make -C kernel_patches "
                         "kernel-test` boots a patched kernel in a VM)"))
    if not feats & PATCHED_FEATURES:
        out.append(Check("resolution backend", "ioctl (UFFDIO_COPY & co.)", True))
        return out
    # patched kernel: really open a writer fd / set a budget (resolve_ring's probes)
    from uffd_aio import resolve_ring

    ok, reason = resolve_ring.probe_write_path()
    out.append(Check("write path", "io_uring WRITE on the UFFDIO_WRITE_FD fd works" if ok
                     else "fails", ok, reason))
    out.append(Check("resolution backend", "ring (Pager(backend='auto') resolves faults with "
                     "io_uring writes; see pager.stats.ring_writes)" if ok
                     else "ioctl (UFFDIO_COPY & co.)", True))
    ok, reason = resolve_ring.probe_poll_mode()
    out.append(Check("poll mode", "UFFDIO_POLL works: Pager(poll=True) or "
                     "Pager(poll_budget_us=N)" if ok else "fails", ok, reason))
    return out


async def _ring_checks() -> list[Check]:
    from uffd_aio.ring import Ring

    out: list[Check] = []
    disabled = _read("/proc/sys/kernel/io_uring_disabled")
    if disabled is not None:
        out.append(Check("kernel.io_uring_disabled", disabled, disabled == "0" or None,
                         "" if disabled == "0" else "io_uring is restricted by sysctl"))
    try:
        ring = Ring(8)
    except OSError as exc:
        out.append(Check("io_uring", "unavailable", False, str(exc)))
        return out
    try:
        flags = []
        if ring.setup_flags & ll.SETUP_COOP_TASKRUN:
            flags.append("COOP_TASKRUN")
        if ring.setup_flags & ll.SETUP_SINGLE_ISSUER:
            flags.append("SINGLE_ISSUER")
        out.append(Check("io_uring", "setup flags: " + (" ".join(flags) or "none"), True))
        ops = ring.probed_ops
        have = [name for name, ok in ops.items() if ok]
        lack = [name for name, ok in ops.items() if not ok]
        out.append(Check("io_uring opcodes", " ".join(have), not lack or None,
                         "" if not lack else "missing: " + " ".join(lack)))
        ms = ops.get("READ_MULTISHOT", False)
        out.append(Check("multishot uffd reads", "available" if ms else "unavailable", ms,
                         "" if ms else "needs Linux 6.7+; the pager uses one-shot reads"))
    finally:
        ring.close()
    return out


def collect() -> list[Check]:
    """All checks, in display order."""
    checks = [
        Check("kernel", f"{platform.release()} ({platform.machine()})"),
        Check("python", f"{platform.python_implementation()} {platform.python_version()}"
              + (" (free-threaded)" if not getattr(sys, "_is_gil_enabled", lambda: True)()
                 else "")),
        Check("liburing", liburing_version()),
    ]
    try:
        import uvloop
        checks.append(Check("uvloop", str(getattr(uvloop, "__version__", "?")), True))
    except ImportError:
        checks.append(Check("uvloop", "not installed", None, "asyncio's loop is used"))
    uffd, feats = _uffd_checks()
    checks += uffd
    checks += asyncio.run(_ring_checks())
    checks += _patched_checks(feats)
    return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    checks = collect()
    if args.json:
        print(json.dumps([attrs.asdict(c) for c in checks], indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark = {True: "ok ", False: "NO ", None: "   "}[c.ok]
            line = f"{mark} {c.name:<{width}}  {c.value}"
            if c.reason:
                line += f"\n    {'':<{width}}  -> {c.reason}"
            print(line)
    essential = [c for c in checks if c.name in ("userfaultfd", "io_uring")]
    return 0 if essential and all(c.ok for c in essential) else 1
