#!/bin/bash
# Runs INSIDE the guest: calibrate the guest's speed against the host, then run the
# Python suite under the stall guard with every limit scaled by the factor.
#
# Usage: guest-pytest.sh <result dir> <host calibration json> <python> <flavour> [pytest args...]
#
# The factor (guest time / host time of calibrate.py's fixed workload, clamped) scales:
#   - every pytest-timeout limit (tests/conftest.py reads UFFD_AIO_TIME_FACTOR);
#   - the waits inside tests (tests/limits.py: limit());
#   - the stall guard's no-output limit and the suite's hard limit.
# UFFD_AIO_TEST_SCALE=guest shrinks the heavy tests' sizes (tests/limits.py: size()).
# On the patched flavour UFFD_AIO_EXPECT_PATCHED=1 turns a skipped patched_kernel test
# into a failure.  Writes <dir>/limits.txt, <dir>/junit.xml and <dir>/durations.txt.
set -uo pipefail
[ $# -ge 4 ] || { sed -n '2,15p' "$0" >&2; exit 2; }
DIR=$1 HOST_JSON=$2 PY=$3 FLAVOUR=$4
shift 4
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

"$PY" "$HERE/calibrate.py" measure "$DIR/calibrate-guest.json" || exit 91
limits=$("$PY" "$HERE/calibrate.py" limits "$HOST_JSON" "$DIR/calibrate-guest.json") || exit 91
eval "$limits"
{
    echo "host:  $(cat "$HOST_JSON")"
    echo "guest: $(cat "$DIR/calibrate-guest.json")"
    echo "$limits"
} >"$DIR/limits.txt"
echo "guest-pytest: speed factor ${FACTOR} (raw ${RAW_FACTOR}): per-test timeout ${TIMEOUT}s" \
     "(marks scaled alike), stall ${STALL}s, suite ${HARD}s"

export UFFD_AIO_TIME_FACTOR=$FACTOR UFFD_AIO_TEST_SCALE=guest
# one event loop per async test in the guest (asyncio; the host runs asyncio and uvloop)
export UFFD_AIO_TEST_LOOPS=${UFFD_AIO_TEST_LOOPS:-asyncio}
if [ "$FLAVOUR" = patched ]; then export UFFD_AIO_EXPECT_PATCHED=1; fi
# The guest's /tmp is tmpfs, which keeps every page: the page-cache-miss tests of the
# native engine put their snapshot files in the (9p, uncached) result folder instead
export UFFD_AIO_EVICTABLE_DIR="$DIR/evictable"

bash "$HERE/guest-stall-guard.sh" "$DIR/output.log" "$STALL" "$HARD" "$DIR" \
    "$PY" -m pytest -p no:cacheprovider -v -ra -o timeout_method=thread \
    --junitxml="$DIR/junit.xml" --durations=25 --durations-min=1.0 "$@"
rc=$?
rm -rf "$UFFD_AIO_EVICTABLE_DIR"
# Every test's time, slowest first: the next slowdown shows here before it fails.
"$PY" - "$DIR/junit.xml" >"$DIR/durations.txt" 2>/dev/null <<'EOF' || true
import sys
import xml.etree.ElementTree as ET

rows = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    state = "passed"
    for child in case:
        if child.tag in ("failure", "error", "skipped"):
            state = child.tag
    rows.append((float(case.get("time", 0)), state, f"{case.get('classname')}::{case.get('name')}"))
for t, state, name in sorted(rows, reverse=True):
    print(f"{t:9.2f}s  {state:8}  {name}")
print(f"{sum(r[0] for r in rows):9.2f}s  total over {len(rows)} tests")
EOF
exit "$rc"
