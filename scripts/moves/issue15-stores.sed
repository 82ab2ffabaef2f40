# issue 15: uffd_aio/handlers/ -> uffd_aio/stores/ (page stores) + uffd_aio/serving/ (attach,
# read-ahead, dirty tracking, working-set installer); redis_local -> examples/remote_memory/.
# Applied by issue15-stores.sh (which skips the compatibility package uffd_aio/handlers/).
# Idempotent: its output contains no "handlers" module path, except on lines that say they
# are kept for compatibility (the guard below leaves any line matching "compatib" alone).

/compatib/b

# the redis-server launcher left the package (tests and the remote_memory example use it)
s#uffd_aio\.handlers\.redis_local\b#examples.remote_memory.redis_local#g
s#\(uffd_aio/\)\{0,1\}handlers/redis_local\.py#examples/remote_memory/redis_local.py#g

# dotted module paths
s#uffd_aio\.handlers\.\(base\|zero\|file\|compressed\|remote\)\b#uffd_aio.stores.\1#g
s#uffd_aio\.handlers\.\(attach\|readahead\|dirty\|setreplay\)\b#uffd_aio.serving.\1#g

# file paths (docs, comments)
s#\(uffd_aio/\)\{0,1\}handlers/\(base\|zero\|file\|compressed\|remote\)\.py#\1stores/\2.py#g
s#\(uffd_aio/\)\{0,1\}handlers/\(attach\|readahead\|dirty\|setreplay\)\.py#\1serving/\2.py#g
s#\(uffd_aio/\)\{0,1\}handlers/__init__\.py#\1stores/__init__.py#g

# "from uffd_aio.handlers import ..." : attach and its records went to serving, the rest to stores
s#^\([[:space:]]*\)from uffd_aio\.handlers import attach, open_backend$#\1from uffd_aio.serving import attach\n\1from uffd_aio.stores import open_backend#
s#^\([[:space:]]*\)from uffd_aio\.handlers import \(attach\|Attachment\|AttachStats\)\(\(, \(attach\|Attachment\|AttachStats\)\)*\)$#\1from uffd_aio.serving import \2\3#
s#from uffd_aio\.handlers import #from uffd_aio.stores import #g

# whatever still names the package: the stores (open_backend, PageStore, BackendError)
s#uffd_aio\.handlers\b#uffd_aio.stores#g
