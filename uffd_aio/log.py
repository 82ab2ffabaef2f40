"""The library's loggers: quiet unless the application asks.

Every uffd_aio component gets its logger from :func:`get_logger`, bound in its
``__init__`` (never at module scope).  A library does not configure logging, so
what the events become is the application's choice:

* the application configured structlog (``structlog.configure``, which
  ``uffd-aio`` itself does for ``-v``/``--log-json``): the events are ordinary
  structlog events from ``structlog.get_logger("uffd_aio")``, every level, and
  the application's processors, filters and renderer decide;
* otherwise they go to the standard library logger ``"uffd_aio"``, filtered by
  its effective level and rendered as one line (``uffd_aio.ring_opened
  component=ring ring_fd=5 ...``).  With logging unconfigured too, Python's
  last-resort handler prints warnings and errors to stderr and nothing else;
  ``logging.basicConfig(level=logging.DEBUG)`` (or a level on the
  ``"uffd_aio"`` logger) shows everything.

The choice is made when a component binds its logger, so configure logging
before creating pagers (as structlog itself expects).
"""

from __future__ import annotations

import logging
from typing import cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

#: the name of the structlog logger and of the standard library logger
LOGGER_NAME = "uffd_aio"


def _render(logger: WrappedLogger, method: str, event_dict: EventDict
            ) -> tuple[tuple[str], dict[str, object]]:
    """``event k=v ...`` as the message; ``exc_info`` goes to the stdlib logger unrendered."""
    exc_info = event_dict.pop("exc_info", None)
    parts = [str(event_dict.pop("event", ""))]
    for k, v in event_dict.items():
        s = v if isinstance(v, str) else repr(v)
        parts.append(f"{k}={s!r}" if (" " in s or not s) else f"{k}={s}")
    kwargs: dict[str, object] = {}
    if exc_info:
        kwargs["exc_info"] = exc_info
    if method == "exception":  # stdlib Logger.exception adds the current exception itself
        kwargs.setdefault("exc_info", True)
    return (" ".join(parts),), kwargs


_STDLIB_PROCESSORS: list[Processor] = [structlog.stdlib.filter_by_level, _render]


def get_logger(**initial_values: object) -> FilteringBoundLogger:
    """A logger for one component, bound to ``initial_values`` (``component=...``)."""
    if structlog.is_configured():
        return cast(FilteringBoundLogger,
                    structlog.get_logger(LOGGER_NAME).bind(**initial_values))
    return cast(FilteringBoundLogger, structlog.wrap_logger(
        logging.getLogger(LOGGER_NAME), processors=_STDLIB_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger, context_class=dict,
    ).bind(**initial_values))
