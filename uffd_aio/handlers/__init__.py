"""Moved to uffd_aio.stores (page stores, ``open_backend``) and uffd_aio.serving (``attach``,
read-ahead, dirty tracking, working-set installer); this name stays for compatibility.

``from uffd_aio.handlers import attach, open_backend`` and the old submodules
(``uffd_aio.handlers.readahead``, ``.file``, ...) keep working; new code imports the new homes.
Nothing inside uffd_aio imports this package.
"""

from typing import TYPE_CHECKING

# through the old submodule name first, as before the move: importing it later would set this
# package's ``attach`` to the module, hiding the function
from uffd_aio.handlers.attach import Attachment, AttachStats, attach
from uffd_aio.stores import open_backend, open_store
from uffd_aio.stores.base import BackendError, PageStore, deprecated_alias

__all__ = ["AttachStats", "Attachment", "BackendError", "PageStore", "attach", "open_backend",
           "open_store"]

if TYPE_CHECKING:
    from uffd_aio.stores.base import Backend as Backend  # deprecated: PageStore
else:
    def __getattr__(name: str) -> object:
        return deprecated_alias(__name__, name)
