"""``python -m uffd_aio`` = the ``uffd-aio`` command."""

import sys

from uffd_aio.cli import main

sys.exit(main())
