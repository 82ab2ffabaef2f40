"""``uffd-aio workingset``: inspect and merge working-set files (:mod:`uffd_aio.workingset`).

* ``uffd-aio workingset show FILE...``: page size, snapshot size and id, pages in the set
  (and written first), runs merged; with several files, the Jaccard index of each pair.
* ``uffd-aio workingset merge A B C --min-runs K -o OUT``: the pages seen in at least K
  of the inputs, ordered by mean first-touch rank (a page missing from an input counts as
  that input's end).
"""

from __future__ import annotations

import argparse
import itertools
import sys

from uffd_aio import workingset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ws_command", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="describe working-set files")
    show.add_argument("files", nargs="+", metavar="FILE")
    merge = sub.add_parser("merge", help="merge recordings into one working set")
    merge.add_argument("files", nargs="+", metavar="FILE")
    merge.add_argument("--min-runs", type=int, default=1, metavar="K",
                       help="keep the pages seen in at least K inputs (1: the union)")
    merge.add_argument("-o", "--output", required=True, metavar="OUT")


def _describe(path: str, ws: workingset.WorkingSet) -> str:
    size = ws.store_pages * ws.page_size
    sid = ws.snapshot_id.hex() if ws.snapshot_id != workingset.NO_ID else "unknown"
    share = len(ws) / ws.store_pages if ws.store_pages else 0.0
    return (f"{path}: {len(ws)} pages ({ws.nbytes} bytes, {share:.1%} of a {size}-byte "
            f"snapshot of {ws.page_size}-byte pages), {len(ws.written)} first written, "
            f"{ws.runs} run(s), snapshot id {sid}")


def main(args: argparse.Namespace) -> int:
    try:
        sets = [workingset.read(f) for f in args.files]
    except (OSError, ValueError) as exc:
        print(f"uffd-aio workingset: {exc}", file=sys.stderr)
        return 2
    if args.ws_command == "show":
        for f, ws in zip(args.files, sets, strict=True):
            print(_describe(f, ws))
        for (fa, a), (fb, b) in itertools.combinations(zip(args.files, sets, strict=True), 2):
            if a.page_size == b.page_size and a.store_pages == b.store_pages:
                print(f"jaccard {fa} {fb}: {workingset.jaccard(a, b):.3f}")
        return 0
    try:
        merged = workingset.merge(sets, min_runs=args.min_runs, names=args.files)
        workingset.write(args.output, merged)
    except (OSError, ValueError) as exc:
        print(f"uffd-aio workingset merge: {exc}", file=sys.stderr)
        return 2
    print(_describe(args.output, merged))
    return 0
