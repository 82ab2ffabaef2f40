"""uffd_aio.handlers moved to uffd_aio.stores and uffd_aio.serving; the old names stay, for
compatibility (issue 15)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import uffd_aio

MOVED = {"base": "stores", "zero": "stores", "file": "stores", "compressed": "stores",
         "remote": "stores", "attach": "serving", "readahead": "serving", "dirty": "serving",
         "setreplay": "serving"}


def test_old_package_names_still_import() -> None:
    from uffd_aio import serving, stores
    from uffd_aio.handlers import (
        Attachment,
        AttachStats,
        BackendError,
        PageStore,
        attach,
        open_backend,
    )
    from uffd_aio.handlers.readahead import AdaptiveWindow

    assert attach is serving.attach and Attachment is serving.Attachment
    assert AttachStats is serving.AttachStats
    assert open_backend is stores.open_store is stores.open_backend
    assert PageStore is stores.PageStore and BackendError is stores.BackendError
    assert AdaptiveWindow is importlib.import_module("uffd_aio.serving.readahead").AdaptiveWindow


@pytest.mark.parametrize("name", sorted(MOVED))
def test_old_submodules_are_the_new_ones(name: str) -> None:
    old = importlib.import_module(f"uffd_aio.handlers.{name}")
    new = importlib.import_module(f"uffd_aio.{MOVED[name]}.{name}")
    assert old is new
    handlers = importlib.import_module("uffd_aio.handlers")
    # ``attach`` names the function there, as it did before the move
    assert getattr(handlers, name) is (new.attach if name == "attach" else new)


def test_old_backend_alias_still_warns() -> None:
    import uffd_aio.handlers
    import uffd_aio.handlers.base

    for mod in (uffd_aio.handlers, uffd_aio.handlers.base):
        with pytest.warns(DeprecationWarning, match="use PageStore"):
            assert mod.Backend is uffd_aio.handlers.PageStore


def test_nothing_in_the_package_imports_the_old_names() -> None:
    root = Path(uffd_aio.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "handlers":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "uffd_aio.handlers" or n.startswith("uffd_aio.handlers.")
                   for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders
