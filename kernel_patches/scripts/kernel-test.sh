#!/bin/bash
# The kernel lane's one entry point: build (or take from the cache) the patched
# kernel, boot it under virtme-ng (QEMU TCG) and run
#   (a) upstream uffd-unit-tests
#   (b) the new uffd selftests the series adds (selftests/NEW_CMDS of the build:
#       new "userfaultfd" lines of run_vmtests.sh + new uffd* binaries)
#   (c) the project's Python suite: <repo>/.venv/bin/python -m pytest <repo>/tests
# then print a summary and exit non-zero on any failure.
#
# Options (environment):
#   REGRESS=1          also build the UNPATCHED kernel, run (a) there and compare
#                      per-test results (a test passing unpatched must pass patched)
#   SUITES="uffd-unit uffd-stress new-selftests pytest"   subset to run
#                      (uffd-stress: the 5 upstream run_vmtests.sh invocations, ~70 s)
#   PATCHES=none       test the unpatched kernel instead (no comparison)
#   SUITE_TIMEOUT=900  per-boot hard timeout in seconds (selftests)
#   SUITE_TIMEOUT_PYTEST=3600  the Python suite's boot: a ceiling only; the suite's
#                      own limits follow the guest's measured speed (calibrate.py,
#                      guest-pytest.sh): per-test timeouts, the stall guard (which
#                      saves task states and stacks to <run>/pytest/hang-*) and the
#                      suite's hard limit
#   GUEST_TESTS="..."  what pytest runs in the guest (default: tests/vm and the
#                      kernel-dependent integration tests)
#   PYTEST_ARGS="..."  extra arguments for pytest
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${SUITES:=uffd-unit uffd-stress new-selftests pytest}"
: "${SUITE_TIMEOUT:=900}"
: "${REGRESS:=0}"
T0=$(date +%s)
trap 'log "kernel-test: stopped by an error at line $LINENO (status $?)"' ERR

RUN=$RUNS_DIR/kernel-test-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$RUN"
log "kernel-test: results in $RUN"

build() {  # build [PATCHES value] -> kernel dir on stdout
    local out
    out=$(PATCHES=${1:-${PATCHES:-series}} "$KP_SCRIPTS_DIR/build-kernel.sh" | tail -n1) || return 1
    echo "$out"
}

declare -A RESULT DETAIL
ORDER=()
record() {  # record <name> <PASS|FAIL|SKIP> <detail>
    ORDER+=("$1"); RESULT[$1]=$2; DETAIL[$1]=$3
}

# uffd-unit-tests output: "Testing <name>... done|skipped [..]|failed [..]"
uffd_unit_table() {  # <output.log> -> "name<TAB>done|skipped|failed"
    sed -n 's/^Testing \(.*\)\.\.\. \(done\|skipped\|failed\).*/\1\t\2/p' "$1"
}
uffd_unit_counts() {  # <output.log> -> "pass=N skip=N fail=N (total=N)"
    grep -o 'Userfaults unit tests: .*' "$1" | tail -n1 | sed 's/Userfaults unit tests: //' | tr -d ','
}

run_uffd_unit() {  # run_uffd_unit <label> <kernel dir>
    local label=$1 kdir=$2 rc=0 dir=$RUN/$1
    local cmd="bash $KP_SCRIPTS_DIR/guest-setup.sh; $kdir/selftests/uffd-unit-tests"
    RESULT_DIR=$dir VM_TIMEOUT=$SUITE_TIMEOUT VM_QUIET=1 \
        "$KP_SCRIPTS_DIR/vm-run.sh" "$kdir" "$cmd" || rc=$?
    local counts
    counts=$(uffd_unit_counts "$dir/output.log" 2>/dev/null || true)
    uffd_unit_table "$dir/output.log" >"$dir/results.tsv" 2>/dev/null || true
    grep -P '\tfailed$' "$dir/results.tsv" | sed 's/^/    FAILED: /' >&2 || true
    if [ "$rc" = 0 ]; then
        record "$label" PASS "${counts:-?} [$(basename "$kdir")]"
    else
        record "$label" FAIL "exit $rc; ${counts:-no summary line} [$dir/output.log]"
    fi
}

run_uffd_stress() {  # <kernel dir>: upstream run_vmtests.sh uffd-stress invocations
    local kdir=$1 rc=0 dir=$RUN/uffd-stress
    mkdir -p "$dir"
    # 128 huge pages (guest-setup.sh) = run_vmtests.sh's hugetlb size for 2 cpus.
    {
        echo "bash $KP_SCRIPTS_DIR/guest-setup.sh"
        echo "cd $kdir/selftests"
        echo 'fails=0'
        echo "for a in 'anon 20 16' 'hugetlb 128 32' 'hugetlb-private 128 32' 'shmem 20 16' 'shmem-private 20 16'; do"
        echo '    ./uffd-stress $a >/dev/null 2>uffd-stress.err; r=$?'
        echo '    [ $r = 0 ] || { cat uffd-stress.err; fails=$((fails+1)); }'
        echo '    echo "=== uffd-stress $a: exit $r"'
        echo 'done 2>&1'
        echo 'exit $fails'
    } | sed "s|uffd-stress.err|$dir/uffd-stress.err|" >"$dir/run-stress.sh"
    RESULT_DIR=$dir VM_TIMEOUT=$SUITE_TIMEOUT VM_QUIET=1 \
        "$KP_SCRIPTS_DIR/vm-run.sh" "$kdir" "bash $dir/run-stress.sh" || rc=$?
    local per
    per=$(sed -n 's/^=== uffd-stress \(.*\): exit \(.*\)/\1 => \2;/p' "$dir/output.log" 2>/dev/null | tr '\n' ' ' || true)
    if [ "$rc" = 0 ]; then
        record uffd-stress PASS "$per"
    else
        record uffd-stress FAIL "exit $rc; $per [$dir/output.log]"
    fi
}

run_new_selftests() {  # <kernel dir>
    local kdir=$1 rc=0 dir=$RUN/new-selftests
    # selftests/NEW_CMDS: the uffd invocations the series adds to run_vmtests.sh
    # plus new uffd* binaries run without arguments (older builds: NEW only).
    local list=$kdir/selftests/NEW_CMDS
    if [ ! -f "$list" ]; then
        list=$RUN/new-cmds
        sed 's|^|./|' "$kdir/selftests/NEW" >"$list" 2>/dev/null || : >"$list"
    fi
    if ! grep -q . "$list"; then
        record new-selftests SKIP "the series adds no uffd selftest"
        return 0
    fi
    mkdir -p "$dir"
    # In the guest: one line of the list at a time, in the selftests folder.
    # exit 0 = pass, 4 = KSFT_SKIP, anything else = fail
    {
        echo "bash $KP_SCRIPTS_DIR/guest-setup.sh"
        echo "cd $kdir/selftests"
        echo 'fails=0'
        echo 'while read -r c; do'
        echo '    [ -n "$c" ] || continue'
        echo '    echo "=== $c"'
        echo '    bash -c "$c" </dev/null; r=$?'
        echo '    echo "=== $c: exit $r"'
        # On the patched kernel a KSFT_SKIP means the series' features are missing: a
        # failure.  Only on an unpatched kernel is a skip the expected answer.
        if [ "$FLAV" = patched ]; then
            echo '    [ $r = 0 ] || fails=$((fails+1))'
        else
            echo '    [ $r = 0 ] || [ $r = 4 ] || fails=$((fails+1))'
        fi
        echo "done <$list"
        echo 'exit $fails'
    } >"$dir/run-new.sh"
    RESULT_DIR=$dir VM_TIMEOUT=$SUITE_TIMEOUT VM_QUIET=1 \
        "$KP_SCRIPTS_DIR/vm-run.sh" "$kdir" "bash $dir/run-new.sh" || rc=$?
    local per
    per=$(sed -n 's/^=== \(.*\): exit \(.*\)/\1 => \2;/p' "$dir/output.log" 2>/dev/null | tr '\n' ' ' || true)
    if [ "$rc" = 0 ]; then
        record new-selftests PASS "$per"
    else
        record new-selftests FAIL "exit $rc; $per [$dir/output.log]"
    fi
}

# What the guest runs: tests/vm and the integration tests whose behaviour depends on the
# kernel; tests/conftest.py (HOST_ONLY) deselects the rest in the guest, with the reason.
: "${GUEST_TESTS:=tests/vm tests/integration}"

run_pytest() {  # <kernel dir>
    local kdir=$1 rc=0 dir=$RUN/pytest
    local py=$REPO_DIR/.venv/bin/python
    if [ ! -x "$py" ]; then
        record pytest FAIL "$py missing: create the project venv first (see README)"
        return 0
    fi
    mkdir -p "$dir"
    # The repository is read-only in the guest: build the C programs the tests run there
    # (the Firecracker-style client, the stand-in VMM) here first.
    make -s -C "$REPO_DIR/benchmarks/c" build/workload \
        && make -s -C "$REPO_DIR/examples/snapshot_restore" vmm \
        || { record pytest FAIL "building the tests' C programs failed"; return 0; }
    # The guest's limits follow its speed: calibrate.py times the same workload here
    # (now, right before the boot) and in the guest (guest-pytest.sh), and every
    # limit of the suite is scaled by the ratio. The boot's own limit is the ceiling
    # of those (calibrate.py MAX_HARD) plus the boot and the calibration.
    "$py" "$KP_SCRIPTS_DIR/calibrate.py" measure "$dir/calibrate-host.json" \
        || { record pytest FAIL "host calibration failed"; return 0; }
    local vm_timeout=${SUITE_TIMEOUT_PYTEST:-3600}
    # shellcheck disable=SC2086
    RESULT_DIR=$dir VM_TIMEOUT=$vm_timeout VM_QUIET=1 \
        "$KP_SCRIPTS_DIR/vm-run.sh" "$kdir" \
        "cd $REPO_DIR && bash $KP_SCRIPTS_DIR/guest-pytest.sh $dir $dir/calibrate-host.json $py $FLAV $GUEST_TESTS ${PYTEST_ARGS:-}" || rc=$?
    local last patched limits
    # pytest's last line, e.g. "40 passed, 2 skipped in 12.3s"
    last=$(grep -E '(passed|failed|errors?|skipped|no tests ran).* in [0-9.]+s' "$dir/output.log" 2>/dev/null \
        | tail -n1 | tr -d '=' | sed 's/^ *//; s/ *$//' || true)
    patched=$(grep -o 'uffd_aio patched_kernel tests: .*' "$dir/output.log" 2>/dev/null | tail -n1 \
        | sed 's/uffd_aio patched_kernel tests: /patched-kernel tests /' || true)
    limits=$(grep -o 'speed factor [0-9.]* (raw [0-9.]*)' "$dir/output.log" 2>/dev/null | tail -n1 || true)
    local extra="${patched:+; $patched}${limits:+; $limits}; durations: $dir/durations.txt"
    if [ "$rc" = 0 ] && [ "$FLAV" = patched ] && ! grep -q ' 0 failed / 0 skipped' <<<"$patched"; then
        rc=1  # the summary line is missing or a patched-kernel test did not run
    fi
    if [ "$rc" = 0 ]; then
        record pytest PASS "${last:-?}$extra"
    else
        local why="exit $rc"
        [ "$rc" != 137 ] || why="stopped at the suite's hard limit (calibrated, $dir/limits.txt): too slow? rerun with PYTEST_ARGS=-v"
        [ "$rc" != 90 ] || why="HUNG (no output for the calibrated stall limit): stacks in $(ls -d "$dir"/hang-* 2>/dev/null | tail -n1)"
        [ "$rc" != 91 ] || why="guest calibration failed"
        [ "$rc" != 124 ] || why="guest timeout (${vm_timeout}s)"
        record pytest FAIL "$why; ${last:-no summary}$extra [$dir/output.log]"
    fi
}

# --- the patched (or PATCHES=none) kernel ---------------------------------------
KDIR=$(build) || die "kernel build failed"
FLAV=$(awk -F= '/^flavour=/{print $2}' "$KDIR/info.txt")
log "kernel-test: $FLAV kernel $KDIR"
for s in $SUITES; do
    case $s in
        uffd-unit) log "suite (a): uffd-unit-tests on the $FLAV kernel"; run_uffd_unit uffd-unit "$KDIR" ;;
        uffd-stress) log "suite (a'): uffd-stress (run_vmtests.sh arguments)"; run_uffd_stress "$KDIR" ;;
        new-selftests) log "suite (b): new selftests"; run_new_selftests "$KDIR" ;;
        pytest) log "suite (c): Python suite in the guest"; run_pytest "$KDIR" ;;
        *) die "unknown suite $s" ;;
    esac
done

# --- optional: regression comparison with the unpatched kernel -------------------
if [ "$REGRESS" = 1 ]; then
    BASE=$(build none) || die "unpatched kernel build failed"
    if [ "$(readlink -f "$BASE")" = "$(readlink -f "$KDIR")" ]; then
        record regression SKIP "the series is empty: patched == unpatched"
    else
        log "regression: uffd-unit-tests on the unpatched kernel"
        [ -f "$RUN/uffd-unit/results.tsv" ] || run_uffd_unit uffd-unit "$KDIR"
        run_uffd_unit uffd-unit-unpatched "$BASE"
        # A test that passes on the unpatched kernel must pass on the patched one.
        regressed=$(join -t "$(printf '\t')" \
            <(sort "$RUN/uffd-unit-unpatched/results.tsv") <(sort "$RUN/uffd-unit/results.tsv") \
            | awk -F'\t' '$2 == "done" && $3 != "done" { print $1 " (" $3 ")" }' || true)
        missing=$(comm -23 <(cut -f1 "$RUN/uffd-unit-unpatched/results.tsv" | sort) \
                           <(cut -f1 "$RUN/uffd-unit/results.tsv" | sort) || true)
        b=$(uffd_unit_counts "$RUN/uffd-unit-unpatched/output.log" || true)
        p=$(uffd_unit_counts "$RUN/uffd-unit/output.log" || true)
        if [ -z "$regressed" ] && [ -z "$missing" ] && [ -s "$RUN/uffd-unit-unpatched/results.tsv" ]; then
            record regression PASS "no regression: unpatched ${b:-?} / patched ${p:-?}"
        else
            record regression FAIL "unpatched ${b:-?} / patched ${p:-?}; regressed: ${regressed:-none}; missing: ${missing:-none}"
        fi
    fi
fi

# --- summary -------------------------------------------------------------------------
fail=0
{
    echo
    echo "==== kernel-test summary ($FLAV kernel $(basename "$KDIR"), $(( $(date +%s) - T0 ))s) ===="
    for n in "${ORDER[@]}"; do
        printf '%-22s %-4s  %s\n' "$n" "${RESULT[$n]}" "${DETAIL[$n]}"
        [ "${RESULT[$n]}" != FAIL ] || fail=1
    done
    echo "results: $RUN"
} | tee "$RUN/summary.txt"
grep -q ' FAIL ' "$RUN/summary.txt" && fail=1
exit "$fail"
