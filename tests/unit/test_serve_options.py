"""uffd_aio.serve_options: the serve options, parsed once into frozen records."""

from __future__ import annotations

import functools

import attrs
import pytest

from uffd_aio.serve_options import (
    AttachOptions,
    ReadaheadSpec,
    ServeOptions,
    pager_options_from,
)
from uffd_aio.serving.readahead import AdaptiveWindow, FixedWindow, NoReadahead


@pytest.mark.parametrize("spec, kind, pages", [
    (None, "off", 1), ("off", "off", 1), (0, "off", 1), (1, "off", 1), ("1", "off", 1),
    (8, "fixed", 8), ("8", "fixed", 8), ("fixed:4", "fixed", 4),
    ("adaptive", "adaptive", 64), ("adaptive:16", "adaptive", 16),
])
def test_readahead_spec_parse(spec: int | str | None, kind: str, pages: int) -> None:
    ra = ReadaheadSpec.parse(spec)
    assert (ra.kind, ra.max_pages) == (kind, pages)
    assert ReadaheadSpec.parse(ra) is ra


def test_readahead_spec_gives_each_region_its_own_policy() -> None:
    ra = ReadaheadSpec.parse("adaptive:32")
    a, b = ra.policy(), ra.policy()
    assert isinstance(a, AdaptiveWindow) and a is not b and a.max_pages == 32
    assert isinstance(ReadaheadSpec.parse("fixed:3").policy(), FixedWindow)
    assert isinstance(ReadaheadSpec().policy(), NoReadahead)
    mine = AdaptiveWindow(2, 8)
    custom = ReadaheadSpec.parse(mine)
    assert custom.kind == "custom" and custom.policy() is mine  # a caller's object: as given


@pytest.mark.parametrize("spec, match", [
    ("sideways", "unknown read-ahead 'sideways'"), ("adaptive:x", "bad read-ahead"),
    (-1, ">= 0"), (True, "read-ahead must be"), (1.5, "not a read-ahead policy"),
])
def test_readahead_spec_rejects(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReadaheadSpec.parse(spec)  # type: ignore[arg-type]


def test_attach_options_from_mapping() -> None:
    a = AttachOptions.from_mapping({"readahead": "adaptive", "replay_batch": 4, "eager": False})
    assert a.readahead.kind == "adaptive" and a.replay_batch == 4 and a.eager is False
    assert AttachOptions.from_mapping(None) == AttachOptions()
    assert AttachOptions.from_mapping(a) is a
    assert a.python_only is None
    tracker = functools.partial(object)
    assert AttachOptions(dirty=tracker).python_only is not None  # type: ignore[arg-type]


@pytest.mark.parametrize("options, match", [
    ({"readahaed": 4}, r"unknown attach option\(s\) \['readahaed'\]"),
    ({"recorder": "x.trace"}, "set by the server: use HandoffServer\\(record=PATH\\)"),
    ({"store_offset": 0}, "set by the server"),
    ({"readahead": "nope"}, "unknown read-ahead"),
    ({"replay_concurrency": 0}, "replay_concurrency must be an int >= 1"),
    ({"replay_max_wait": -1}, "replay_max_wait"),
    ({"eager": "yes"}, "eager must be"),
    ({"dirty": 3}, "dirty must be"),
])
def test_attach_options_reject(options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttachOptions.from_mapping(options)


def test_pager_options() -> None:
    assert pager_options_from({"max_inflight": 8}) == {"max_inflight": 8}
    with pytest.raises(ValueError, match="unknown pager option"):
        pager_options_from({"max_inflgiht": 8})
    with pytest.raises(ValueError, match="on_error"):
        pager_options_from({"on_error": "raise"})


@pytest.mark.parametrize("kw, match", [
    ({"remove": "forget"}, "remove must be 'refetch' or 'zero'"),
    ({"on_error": "raise"}, "one client's failure"),
    ({"on_fatal": "panic"}, "on_fatal must be"),
    ({"fd_store": "disk"}, "fd_store must be"),
    ({"takeover": True}, "takeover needs a state_dir"),
    ({"max_clients": 0}, "at least 1"),
    ({"replay_chunk": 0}, "replay_chunk"),
])
def test_serve_options_reject(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServeOptions(**kw)  # type: ignore[arg-type]


def test_serve_options_python_only() -> None:
    assert ServeOptions().python_only is None
    assert "--no-native" in str(ServeOptions(native=False).python_only)
    # recording stays native: the engine logs first touches
    assert ServeOptions(record="t").python_only is None
    assert ServeOptions(record_set="s").python_only is None


def test_from_args_parses_once() -> None:
    from uffd_aio.cli import build_parser

    base = ["serve", "--socket", "s", "--backend", "zero"]
    opts = ServeOptions.from_args(build_parser().parse_args(
        [*base, "--readahead", "adaptive:16", "--remove", "zero", "--allow-uid", "7",
         "--state-dir", "d"]))
    assert opts.attach.readahead == ReadaheadSpec.parse("adaptive:16")
    assert opts.remove == "zero" and opts.allow_uids == frozenset({7})
    assert opts.state_dir is not None and opts.state_dir.endswith("/d")
    defaults = ServeOptions.from_args(build_parser().parse_args(base))
    assert attrs.evolve(defaults) == ServeOptions()
    with pytest.raises(ValueError, match="unknown read-ahead"):
        ServeOptions.from_args(build_parser().parse_args([*base, "--readahead", "x"]))


def test_handoff_server_converts_its_keywords_once() -> None:
    from uffd_aio.server import HandoffServer
    from uffd_aio.stores.zero import ZeroBackend

    s = HandoffServer("/nonexistent/u.sock", ZeroBackend(),
                      attach_options={"readahead": "fixed:4"}, pager_options={"poll": False})
    assert s.options.attach.readahead.kind == "fixed" and s.options.pager == {"poll": False}
    opts = ServeOptions(remove="zero")
    assert HandoffServer("/nonexistent/u.sock", ZeroBackend(), options=opts).options is opts
    with pytest.raises(TypeError, match="not both"):
        HandoffServer("/nonexistent/u.sock", ZeroBackend(), options=opts, remove="zero")
    with pytest.raises(ValueError, match="unknown attach option"):
        HandoffServer("/nonexistent/u.sock", ZeroBackend(), attach_options={"bogus": 1})
    with pytest.raises(ValueError, match="unknown pager option"):
        HandoffServer("/nonexistent/u.sock", ZeroBackend(), pager_options={"bogus": 1})
