"""The ``uffd-aio`` command: doctor, demo, serve, bench, soak, workingset.

Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``main(args) -> int``; this module only wires them up, so importing the
CLI stays cheap and a broken optional subcommand cannot break ``doctor``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

import structlog
from structlog.typing import Processor

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("uffd_aio.doctor", "what this kernel and machine support, and why not"),
    "demo": ("uffd_aio.demo", "page a large region through an asyncio handler and verify it"),
    "serve": ("uffd_aio.serve_cli", "serve uffds handed over a Unix socket (Firecracker protocol)"),
    "bench": ("uffd_aio.bench.cli", "benchmark against the C reference handler"),
    "soak": ("uffd_aio.soak", "many checked clients against uffd-aio serve; RSS/fd trend"),
    "workingset": ("uffd_aio.workingset_cli", "show and merge working-set recordings"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uffd-aio", description="asyncio-native userfaultfd pager over io_uring")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug); logs go to stderr")
    parser.add_argument("--log-json", action="store_true", help="log as JSON lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (modname, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:
            p.set_defaults(_unavailable=f"{name} is unavailable: {exc}")
            continue
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def configure_logging(verbose: int, *, json_lines: bool = False) -> None:
    """The command is an application, so it (not the library) configures structlog."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    renderer: Processor = (structlog.processors.JSONRenderer() if json_lines
                           else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.format_exc_info if json_lines
                    else structlog.dev.set_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, json_lines=args.log_json)
    unavailable = getattr(args, "_unavailable", None)
    if unavailable:
        print(f"uffd-aio: {unavailable}", file=sys.stderr)
        return 2
    try:
        rc: int = args._main(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
