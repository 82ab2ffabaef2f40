"""The options of ``uffd-aio serve`` / :class:`~uffd_aio.server.HandoffServer`, parsed once.

Everything a server is told arrives through one of two doors -- the command line
(:func:`add_arguments`, :meth:`ServeOptions.from_args`) or the keywords of
``HandoffServer(...)`` (including the older ``attach_options={...}`` and
``pager_options={...}`` dictionaries, converted by :meth:`AttachOptions.from_mapping`
and :func:`pager_options_from`) -- and is turned into the frozen records below right
there, validated: a bad value fails when the server is made, with a message that
names it, never later per client.  Downstream code reads typed fields.

* :class:`ReadaheadSpec` -- a read-ahead (``--readahead``): a fresh policy per
  region (:meth:`~ReadaheadSpec.policy`) and what the native engine makes of it.
* :class:`AttachOptions` -- how every region is attached
  (:func:`uffd_aio.serving.attach.attach`'s server-wide keywords).
* :class:`ServeOptions` -- the whole serving policy.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Literal, TypedDict, cast

import attrs

from uffd_aio.handoff_proto import DEFAULT_MAX_MAPPINGS, DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_TOTAL
from uffd_aio.serving.readahead import (
    AdaptiveWindow,
    FixedWindow,
    NoReadahead,
    ReadaheadPolicy,
    policy_from,
)

if TYPE_CHECKING:
    from uffd_aio.modes import Feature
    from uffd_aio.serving.attach import DirtyPolicy

__all__ = [
    "AttachOptions",
    "FatalPolicy",
    "FdStoreChoice",
    "PagerOptions",
    "ReadaheadSpec",
    "RemovePolicy",
    "ServeErrorPolicy",
    "ServeOptions",
    "add_arguments",
    "pager_options_from",
    "parse_size",
]

#: after a REMOVE (balloon, MADV_DONTNEED): fetch the pages again, or serve zeros
RemovePolicy = Literal["refetch", "zero"]
#: on an unrecoverable server failure: leave the clients waiting, or SIGKILL them
FatalPolicy = Literal["hang", "kill-clients"]
FdStoreChoice = Literal["auto", "keeper", "systemd"]
#: the pager error policies a server allows (one client's failure never stops the server)
ServeErrorPolicy = Literal["poison", "zero"]


# ---- read-ahead ---------------------------------------------------------------------


@attrs.frozen
class ReadaheadSpec:
    """A read-ahead, parsed once (:meth:`parse`).

    Built-in policies are kept as their parameters, so that every region gets a
    policy of its own (:meth:`policy`: an adaptive window's streams are per region);
    a caller's policy object is used as given (shared, as ``attach`` always did)."""

    #: "off" (one page per fault), "fixed" (``max_pages``), "adaptive" (1..``max_pages``),
    #: "custom" (``custom``)
    kind: Literal["off", "fixed", "adaptive", "custom"] = "off"
    max_pages: int = 1
    custom: ReadaheadPolicy | None = None
    #: what was given, for messages (not compared)
    text: str = attrs.field(default="off", eq=False)

    @classmethod
    def parse(cls, spec: ReadaheadSpec | ReadaheadPolicy | int | str | None) -> ReadaheadSpec:
        """From ``--readahead``'s text (``off``, ``N``, ``fixed:N``, ``adaptive``,
        ``adaptive:MAX``), an int window, None (off), a policy object or a spec.
        ValueError (with the text) when it is none of these."""
        if isinstance(spec, ReadaheadSpec):
            return spec
        try:
            policy = policy_from(spec)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        except ValueError as exc:
            if isinstance(spec, str) and "unknown read-ahead" not in str(exc):
                raise ValueError(f"bad read-ahead {spec!r}: {exc}") from None
            raise
        text = spec if isinstance(spec, str) else "off" if spec is None else repr(spec)
        if not isinstance(spec, (int, str)) and spec is not None:
            return cls("custom", 1, policy, text)
        if isinstance(policy, NoReadahead):
            return cls("off", 1, None, text)
        if isinstance(policy, FixedWindow):
            return cls("fixed", policy.pages, None, text)
        assert isinstance(policy, AdaptiveWindow)
        return cls("adaptive", policy.max_pages, None, text)

    def policy(self) -> ReadaheadPolicy:
        """The policy for one region (a new one, but for a caller's own object)."""
        if self.custom is not None:
            return self.custom
        if self.kind == "fixed":
            return FixedWindow(self.max_pages)
        if self.kind == "adaptive":
            return AdaptiveWindow(max_pages=self.max_pages)
        return NoReadahead()

    @property
    def is_off(self) -> bool:
        return self.kind == "off"


def _readahead(value: object) -> ReadaheadSpec:
    return ReadaheadSpec.parse(cast("ReadaheadSpec | ReadaheadPolicy | int | str | None", value))


# ---- attach ------------------------------------------------------------------------

#: ``attach_options`` keys the server sets itself, per client or region
_SERVER_SET = {
    "store_offset": "the server attaches each mapping at its handoff offset",
    "recorder": "use HandoffServer(record=PATH) (--record)",
    "replay": "use HandoffServer(replay=PATH) (--replay)",
    "zero_removed": "use HandoffServer(remove='zero') (--remove zero)",
    "observe": "use HandoffServer(record_set=PATH) (--record-set)",
}


def _positive(name: str) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(_inst: object, _a: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, not {value!r}")
    return check


@attrs.frozen
class AttachOptions:
    """How every region of every client is attached (the server-wide keywords of
    :func:`uffd_aio.serving.attach.attach`; per-client parts -- the recorders, the
    replay, ``--remove zero``'s ranges -- are the server's)."""

    readahead: ReadaheadSpec = attrs.field(factory=ReadaheadSpec, converter=_readahead)
    #: dirty tracking (a tracker, or a factory: one tracker per region)
    dirty: DirtyPolicy | Callable[[], DirtyPolicy] | None = None
    replay_concurrency: int = attrs.field(default=2, validator=_positive("replay_concurrency"))
    replay_batch: int = attrs.field(default=16, validator=_positive("replay_batch"))
    replay_max_wait: float = 0.005
    eager: bool | None = None

    def __attrs_post_init__(self) -> None:
        if isinstance(self.replay_max_wait, bool) or \
                not isinstance(self.replay_max_wait, (int, float)) or self.replay_max_wait < 0:
            raise ValueError(f"replay_max_wait must be seconds >= 0, not "
                             f"{self.replay_max_wait!r}")
        if self.eager is not None and not isinstance(self.eager, bool):
            raise ValueError(f"eager must be True, False or None, not {self.eager!r}")
        if self.dirty is not None and not callable(self.dirty) and \
                not hasattr(self.dirty, "bind"):
            raise ValueError(f"dirty must be a tracker or a factory of trackers, not "
                             f"{self.dirty!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, object] | AttachOptions | None
                     ) -> AttachOptions:
        """From the ``attach_options={...}`` dictionary of ``HandoffServer``: unknown keys
        and bad values are a ValueError now, not a failure of every client later."""
        if options is None:
            return cls()
        if isinstance(options, AttachOptions):
            return options
        known = {a.name for a in attrs.fields(cls)}
        for key in options:
            if key in _SERVER_SET:
                raise ValueError(f"attach option {key!r} is set by the server: "
                                 f"{_SERVER_SET[key]}")
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown attach option(s) {unknown}: expected some of "
                             f"{sorted(known)}")
        return cls(**options)  # type: ignore[arg-type]  # checked by the validators

    @property
    def python_only(self) -> str | None:
        """Why regions attached with these options need Python on every fault (None:
        the native engine can serve them)."""
        if self.dirty is not None:
            return "dirty tracking needs the write-protect faults in Python"
        return None


def _attach_options(value: Mapping[str, object] | AttachOptions | None) -> AttachOptions:
    return AttachOptions.from_mapping(value)


# ---- the pager -----------------------------------------------------------------------


class PagerOptions(TypedDict, total=False):
    """What ``pager_options={...}`` may set on each client's :class:`~uffd_aio.pager.Pager`
    (its uffd, ring and name are the server's)."""

    features: Feature | int
    required: Feature | int
    max_inflight: int
    handler_timeout: float | None
    backend: Literal["auto", "ioctl", "ring"]
    poll: bool
    poll_budget_us: float | None
    eager: bool
    follow_forks: bool
    read_mode: Literal["auto", "multishot", "read", "poll"]
    close_timeout: float
    stall_warning: float | None
    native_reads: int
    native_budget_us: float
    native_read_slots: int


def pager_options_from(options: Mapping[str, object] | None) -> PagerOptions:
    """``pager_options={...}``, checked for unknown keys (ValueError)."""
    if not options:
        return PagerOptions()
    if "on_error" in options:
        raise ValueError("pager option 'on_error' is set by the server: use "
                         "HandoffServer(on_error=...) (--on-error)")
    unknown = sorted(set(options) - PagerOptions.__optional_keys__)
    if unknown:
        raise ValueError(f"unknown pager option(s) {unknown}: expected some of "
                         f"{sorted(PagerOptions.__optional_keys__)}")
    return cast("PagerOptions", dict(options))


# ---- the server ------------------------------------------------------------------------


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[object, attrs.Attribute[str],
                                                             str], None]:
    def check(_inst: object, _a: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be " + " or ".join(repr(c) for c in choices)
                             + f", not {value!r}")
    return check


def _path(value: str | os.PathLike[str] | None) -> str | None:
    return os.fspath(value) if value is not None else None


def _abspath(value: str | os.PathLike[str] | None) -> str | None:
    return os.path.abspath(os.fspath(value)) if value is not None else None


def _uids(value: Collection[int] | None) -> frozenset[int] | None:
    return frozenset(value) if value is not None else None


@attrs.frozen
class ServeOptions:
    """The serving policy of a :class:`~uffd_aio.server.HandoffServer` (every option but
    its socket path, its backend and who closes the backend).  See ``uffd-aio serve
    --help`` (:func:`add_arguments`) for each option."""

    allow_uids: frozenset[int] | None = attrs.field(default=None, converter=_uids)
    handoff_timeout: float = 5.0
    max_mappings: int = DEFAULT_MAX_MAPPINGS
    max_total: int = DEFAULT_MAX_TOTAL
    max_payload: int = DEFAULT_MAX_PAYLOAD
    max_clients: int = 1024
    max_pending: int = 128
    remove: RemovePolicy = attrs.field(default="refetch",
                                       validator=_choice("remove", ("refetch", "zero")))
    keep_after_eof: bool = False
    on_error: ServeErrorPolicy = "poison"
    attach: AttachOptions = attrs.field(factory=AttachOptions, converter=_attach_options)
    pager: PagerOptions = attrs.field(factory=PagerOptions, converter=pager_options_from,
                                      hash=False)
    socket_mode: int = 0o600
    record: str | None = attrs.field(default=None, converter=_path)
    replay: str | None = attrs.field(default=None, converter=_path)
    record_set: str | None = attrs.field(default=None, converter=_path)
    record_set_pages: int | None = None
    record_set_seconds: float | None = None
    fill: bool = False
    snapshot_id: str | None = None
    replay_chunk: int = attrs.field(default=1024, validator=_positive("replay_chunk"))
    state_dir: str | None = attrs.field(default=None, converter=_abspath)
    takeover: bool = False
    on_fatal: FatalPolicy = attrs.field(default="hang", validator=_choice(
        "on_fatal", ("hang", "kill-clients")))
    fd_store: FdStoreChoice = attrs.field(default="auto", validator=_choice(
        "fd_store", ("auto", "keeper", "systemd")))
    keeper_idle: float = 30.0
    pidfd_getfd: bool = False
    takeover_drain: float = 1.0
    native: bool = True

    def __attrs_post_init__(self) -> None:
        if self.on_error not in ("poison", "zero"):
            raise ValueError("on_error must be 'poison' or 'zero' (one client's failure "
                             "must not stop the server)")
        if self.max_clients < 1 or self.max_pending < 1:
            raise ValueError("max_clients and max_pending must be at least 1")
        if self.record_set is not None and self.attach.dirty is not None:
            raise ValueError("working-set record/replay does not support dirty tracking")
        if self.takeover and self.state_dir is None:
            raise ValueError("takeover needs a state_dir (the running server listens for "
                             "takeovers in its state directory)")

    @property
    def python_only(self) -> str | None:
        """Why no region can be served by the native engine whatever its backend (None:
        it depends on the backend and the mapping)."""
        if not self.native:
            return "native serving is off (--no-native)"
        # --record / --record-set stay native: the engine logs first touches (serve_from's
        # record=), drained into the same recorders (HandoffServer._serve_region)
        return self.attach.python_only

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        """From ``uffd-aio serve``'s arguments (:func:`add_arguments`); ValueError for a
        bad value (e.g. ``--readahead``)."""
        return cls(
            allow_uids=args.allow_uid, handoff_timeout=args.handoff_timeout,
            max_mappings=args.max_mappings, max_total=args.max_total,
            max_clients=args.max_clients, max_pending=args.max_pending, remove=args.remove,
            keep_after_eof=args.keep_after_eof, on_error=args.on_error,
            attach=AttachOptions(readahead=ReadaheadSpec.parse(args.readahead)),
            record=args.record, replay=args.replay, record_set=args.record_set,
            record_set_pages=args.record_set_pages, record_set_seconds=args.record_set_seconds,
            fill=args.fill, snapshot_id=args.snapshot_id, replay_chunk=args.replay_chunk,
            state_dir=args.state_dir, takeover=args.takeover, on_fatal=args.on_fatal,
            fd_store=args.fd_store, keeper_idle=args.keeper_idle, pidfd_getfd=args.pidfd_getfd,
            native=args.native,
        )


# ---- the command line -------------------------------------------------------------------

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64M``, ``1g``, ``2TiB`` -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _SUFFIX else ""
    try:
        value = int(t[: len(t) - len(unit)]) * _SUFFIX[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="Unix socket to listen on (Firecracker's uffd socket path)")
    parser.add_argument("--backend", required=True, metavar="SPEC",
                        help="zero | file:PATH[?nowait] | compressed: | "
                             "redis://host:port/db?prefix=P")
    parser.add_argument("--allow-uid", type=int, action="append", metavar="UID",
                        help="accept only peers with this uid (repeatable; default: any)")
    parser.add_argument("--metrics-port", type=int, metavar="N",
                        help="serve Prometheus metrics on 127.0.0.1:N (needs prometheus-client)")
    parser.add_argument("--readahead", metavar="POLICY",
                        help="read-ahead: off, N pages, fixed:N, adaptive, adaptive:MAX")
    parser.add_argument("--record", metavar="FILE",
                        help="record the order of each client's first faults to FILE "
                             "(rewritten whenever a client is released: record one VM)")
    parser.add_argument("--replay", metavar="FILE",
                        help="prefetch every client's pages from FILE in the background "
                             "(real faults go first): a working set (--record-set, "
                             "`uffd-aio workingset merge`) is installed as a set, in "
                             "first-touch order and batched copies; an order trace "
                             "(--record) is prefetched in its order")
    parser.add_argument("--record-set", metavar="FILE",
                        help="record each client's working set (pages touched, first-touch "
                             "order, read/write) to FILE when it is released; serves in "
                             "Python without read-ahead while recording")
    parser.add_argument("--record-set-pages", type=int, metavar="N",
                        help="stop recording the set after N pages")
    parser.add_argument("--record-set-seconds", type=float, metavar="S",
                        help="stop recording the set S seconds after the first fault")
    parser.add_argument("--fill", action="store_true",
                        help="with a working set to --replay: after the set, install the "
                             "rest of the memory in the background at low priority, so the "
                             "client ends with no faults left")
    parser.add_argument("--snapshot-id", metavar="TEXT",
                        help="identity of the snapshot stored in (and checked against) "
                             "working sets (default: a fingerprint of a file: snapshot)")
    parser.add_argument("--replay-chunk", type=int, default=1024, metavar="PAGES",
                        help="working-set replay batch: pages per batch between which "
                             "faults are served (1024)")
    parser.add_argument("--remove", choices=["refetch", "zero"], default="refetch",
                        help="after REMOVE (balloon/MADV_DONTNEED): fetch the pages again "
                             "(default) or serve zeros")
    parser.add_argument("--keep-after-eof", action="store_true",
                        help="keep serving a client whose socket closed until its process "
                             "exits (VMMs that close the socket after the handoff)")
    parser.add_argument("--max-mappings", type=int, default=DEFAULT_MAX_MAPPINGS,
                        help=f"mappings per client ({DEFAULT_MAX_MAPPINGS})")
    parser.add_argument("--max-total", type=parse_size, default=DEFAULT_MAX_TOTAL,
                        metavar="BYTES", help="memory per client (1T)")
    parser.add_argument("--max-clients", type=int, default=1024,
                        help="clients served at once (1024); only completed handoffs count")
    parser.add_argument("--max-pending", type=int, default=128,
                        help="connections that have not completed their handoff yet (128); "
                             "when full, the one waiting longest is dropped")
    parser.add_argument("--handoff-timeout", type=float, default=5.0, metavar="S",
                        help="seconds a client has to send its handoff (5)")
    parser.add_argument("--on-error", choices=["poison", "zero"], default="poison",
                        help="a failed fetch: SIGBUS in the faulting thread (default) or a "
                             "zero page")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="crash-safe serving: keep each client's state in DIR and its "
                             "uffd in an fd store, so a restarted server (or one started "
                             "with --takeover) serves every client again (docs/handoff.md)")
    parser.add_argument("--takeover", action="store_true",
                        help="live upgrade: receive every client of the server running on "
                             "--state-dir (which then exits) instead of starting empty")
    parser.add_argument("--fd-store", choices=["auto", "keeper", "systemd"], default="auto",
                        help="where the uffds survive the server: systemd's fd store "
                             "(auto when NOTIFY_SOCKET is set) or an fd-keeper process")
    parser.add_argument("--keeper-idle", type=float, default=30.0, metavar="S",
                        help="the fd keeper exits after S seconds holding no fds with no "
                             "server connected (30)")
    parser.add_argument("--pidfd-getfd", action="store_true",
                        help="last resort when a client's uffd is in no store: take it from "
                             "the client with pidfd_getfd(2) (needs ptrace rights over it)")
    parser.add_argument("--on-fatal", choices=["hang", "kill-clients"], default="hang",
                        help="on an unrecoverable server failure: leave the clients waiting "
                             "(default; with --state-dir the next server serves them) or "
                             "SIGKILL them (Firecracker's advice without a state dir)")
    parser.add_argument("--no-native", dest="native", action="store_false",
                        help="serve file:/zero backends through Python (every fault in the "
                             "fault handler) instead of the native engine, to compare or "
                             "as an escape hatch")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
