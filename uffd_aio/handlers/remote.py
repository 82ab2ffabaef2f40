"""Moved to :mod:`uffd_aio.stores.remote`; this name stays for compatibility.

The old module name is the new module itself (same object in ``sys.modules``), so private
names, monkeypatching and ``isinstance`` behave as before.
"""

import importlib
import sys

from uffd_aio.stores.remote import *  # noqa: F403

sys.modules[__name__] = importlib.import_module("uffd_aio.stores.remote")
