#!/bin/bash
# Runs INSIDE the guest (via vm-run.sh) before the uffd tests: idempotent setup
# that tools/testing/selftests/mm/run_vmtests.sh would otherwise do.
set -uo pipefail
# hugetlb tests in uffd-unit-tests / uffd-stress need free huge pages (256 MiB).
echo "${NR_HUGEPAGES:-128}" > /proc/sys/vm/nr_hugepages 2>/dev/null || true
# CONFIG_GUP_TEST interface (uffd-unit-tests' pin test).
mountpoint -q /sys/kernel/debug 2>/dev/null || mount -t debugfs none /sys/kernel/debug 2>/dev/null || true
# Let non-root users create uffds too (harmless as root).
echo 1 > /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null || true
echo "guest-setup: kernel $(uname -r), hugepages $(cat /proc/sys/vm/nr_hugepages), thp $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
