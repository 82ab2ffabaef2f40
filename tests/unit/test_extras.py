"""Optional dependencies are extras: without one, the feature that needs it says which extra
to install (issue 15).  The missing package is simulated by an import hook."""

from __future__ import annotations

import builtins
import sys
from typing import Any

import pytest

from uffd_aio.errors import MissingExtra
from uffd_aio.stores import open_backend


def _without(monkeypatch: pytest.MonkeyPatch, package: str, *reimport: str) -> None:
    """Make ``import package[.x]`` fail, and forget ``reimport`` so it imports again."""
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == package or name.startswith(package + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    for mod in reimport:
        monkeypatch.delitem(sys.modules, mod, raising=False)


async def test_redis_backend_without_redis_names_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "redis", "uffd_aio.stores.remote")
    with pytest.raises(MissingExtra, match=r"pip install 'uffd-aio\[redis\]'") as info:
        await open_backend("redis://127.0.0.1:1/0")
    assert info.value.extra == "redis" and info.value.package == "redis"
    assert "Redis backend" in str(info.value)
    assert isinstance(info.value, ImportError)  # `except ImportError` still catches it


def test_local_redis_without_redis_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "redis", "examples.remote_memory.redis_local")
    with pytest.raises(MissingExtra, match=r"pip install 'uffd-aio\[redis\]'"):
        import examples.remote_memory.redis_local  # noqa: F401


async def test_compressed_backend_without_zstandard_names_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "zstandard", "uffd_aio.stores.compressed")
    with pytest.raises(MissingExtra, match=r"pip install 'uffd-aio\[zstd\]'") as info:
        await open_backend("compressed:")
    assert info.value.package == "zstandard"

