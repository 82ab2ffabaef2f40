#!/usr/bin/env python3
"""Working-set replay benchmark: ``uffd_aio.bench.workingset`` (also ``uffd-aio bench
--workingset``); see benchmarks/README.md, "Working-set replay".

    .venv/bin/python benchmarks/workingset.py [--mib 256] [--subset 300] [--repeats 5]
                                             [--threads 2] [--quick] [--cold] [--json FILE]
"""

import sys

from uffd_aio.bench.workingset import main

if __name__ == "__main__":
    sys.exit(main())
