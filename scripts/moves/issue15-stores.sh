#!/bin/sh
# Re-apply the issue-15 renames (uffd_aio.handlers -> uffd_aio.stores / uffd_aio.serving) to
# every tracked text file, e.g. after merging a branch written against the old layout.
# Run from the repository root: scripts/moves/issue15-stores.sh
# Skips the compatibility package (uffd_aio/handlers/) and these scripts.  pager.py, fault.py,
# region.py and native.py only get their import lines rewritten (their text is another branch's).
set -eu
here=$(dirname "$0")
sed_file="$here/issue15-stores.sed"
# the example runs as a script: its own directory is on sys.path, the repository root is not
sed -i 's#^from uffd_aio\.handlers\.redis_local import#from redis_local import#' \
    examples/remote_memory/remote_memory.py
git ls-files -- '*.py' '*.md' '*.toml' '*.sh' '*.cfg' '*.txt' '*.rst' '*.ini' '*.yml' '*.yaml' |
while read -r f; do
    case "$f" in
        uffd_aio/handlers/*|scripts/moves/*) continue ;;
        uffd_aio/pager.py|uffd_aio/fault.py|uffd_aio/region.py|uffd_aio/native.py)
            # import lines only (a multi-line import's first line names the module)
            sed -i "/^[[:space:]]*\(from\|import\) /{
$(grep -v '^#' "$sed_file" | grep -v '^$')
}" "$f" ;;
        *) grep -q 'handlers' "$f" && sed -i -f "$sed_file" "$f" || true ;;
    esac
done
