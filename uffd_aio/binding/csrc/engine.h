/* Native fault engine (engine.c): serves the page faults of regions whose
 * content is a buffer, a file mapping or zeros, in C, from the pager's read
 * completion; everything else is passed up to Python.  One engine per uffd
 * context, used only by the loop thread (no locking).  Plain C types only:
 * this file is also the cffi cdef. */
struct ua_engine;

struct ua_engine_stats {
    uint64_t native_faults;    /* fault messages resolved in C (duplicates included) */
    uint64_t pages_copied;     /* pages placed by UFFDIO_COPY, read-ahead included */
    uint64_t zero_pages;       /* pages placed by UFFDIO_ZEROPAGE */
    uint64_t readahead_pages;  /* of those, pages beyond the faulting one */
    uint64_t wakes;            /* EEXIST: the page was already there, thread woken */
    uint64_t cache_misses;     /* file pages not in the page cache: passed up */
    uint64_t passed_up;        /* messages left for Python (faults, events, errors) */
    uint64_t reads;            /* read(2) calls made by the engine on the uffd */
    uint64_t ioctls;           /* COPY/ZEROPAGE/WAKE ioctls */
    /* phase 2 (ua_engine_attach) */
    uint64_t cache_reads;      /* io_uring READs of file pages not in the page cache */
    uint64_t cache_read_pages; /* pages those READs asked for */
    uint64_t read_waits;       /* faults that joined a READ already in flight */
    uint64_t read_passed_up;   /* faults passed up after a failed or short READ */
    uint64_t ring_writes;      /* io_uring WRITEs on the uffd's writer fd (patched kernel) */
    uint64_t pwrites;          /* pwrite(2)s finishing a short or EEXIST ring write */
    uint64_t submits;          /* io_uring_enter calls made by the engine (before lingering) */
    /* first-touch log (ua_engine_record) */
    uint64_t touches;          /* entries logged */
    uint64_t touch_full;       /* faults passed up because the log was full */
};

/* One demand fault the engine took on a recording region (ua_engine_record):
 * region id, the fault's page index in the region, the pages it placed from
 * there (the faulting one and its read-ahead window, or the window an
 * io_uring READ fetches; 0 when it placed nothing: the page was already
 * there, or a READ in flight brings it) and whether it was a write. */
struct ua_touch {
    uint64_t rel;
    int32_t region;
    uint16_t pages;
    uint16_t write;
};

/* source kinds */
#define UA_SRC_MEMORY 0
#define UA_SRC_ZERO 1
#define UA_SRC_FILE 2

/* max read-ahead window in pages */
#define UA_ENGINE_MAX_WINDOW 1024
/* entries of the first-touch log (a full log passes faults up to Python) */
#define UA_ENGINE_LOG_CAP 4096

struct ua_engine *ua_engine_new(int uffd);
void ua_engine_free(struct ua_engine *e);

/* Serve [start, start+len) (page_size multiples) from a source: kind
 * UA_SRC_MEMORY (src = address of the region's first byte in a buffer of
 * src_len bytes), UA_SRC_FILE (src = page-aligned address in a read-only
 * file mapping; pages not in the page cache are passed up) or UA_SRC_ZERO.
 * Read-ahead: ra_min == ra_max -> fixed window; ra_min < ra_max -> adaptive
 * (doubles on sequential hits up to ra_max, back to ra_min otherwise).
 * Returns the region id (>= 0) or -errno (EINVAL bad argument, EEXIST
 * overlap, ENOMEM). */
int ua_engine_add(struct ua_engine *e, uint64_t start, uint64_t len, uint64_t page_size,
                  int kind, uint64_t src, uint64_t src_len, uint32_t ra_min, uint32_t ra_max);
/* Forget region id (all its ranges; it may have moved or been split by
 * UNMAP/REMAP events).  0 or -ENOENT. */
int ua_engine_drop(struct ua_engine *e, int id);
/* Number of regions and ranges in the table (tests). */
int ua_engine_nranges(struct ua_engine *e);

/* Handle the nbytes of uffd_msg at buf (a buffer of cap bytes): resolve the
 * faults on native regions, update the table from REMOVE/UNMAP/REMAP, and
 * move every message Python must see (in order) to the start of buf.
 * While a batch was all native and max_reads/budget_ns allow, read(2) the
 * (non-blocking) uffd into buf again and repeat; budget_ns > 0 also spins
 * (sched_yield) on an empty uffd until the budget is spent.  Returns the
 * number of messages left at buf for Python, or -EINVAL. */
int ua_engine_run(struct ua_engine *e, uint64_t buf, uint32_t nbytes, uint32_t cap,
                  int max_reads, int64_t budget_ns);
void ua_engine_get_stats(struct ua_engine *e, struct ua_engine_stats *out);

/* Phase 2: put the engine on the pager's io_uring ring r (a struct ua_ring
 * of native.h; it must stay alive until ua_engine_free, or tell the engine
 * when freed, which ua_ring_free does).  read_slots > 0: a file page not in
 * the page cache becomes an io_uring READ (file regions with ua_engine_file)
 * into a pool of read_slots buffers of slot_bytes each, and the COPY happens
 * in C when it completes (other faults on its pages wait for it); 0 passes
 * misses up as before.  wfd >= 0: the uffd's writer fd (UFFDIO_WRITE_FD,
 * patched kernels): resolutions become io_uring WRITEs on it instead of
 * ioctls, submitted with the pager's next io_uring_enter.  0 or -errno. */
int ua_engine_attach(struct ua_engine *e, struct ua_ring *r, int wfd, uint32_t read_slots,
                     uint32_t slot_bytes);
/* file region id reads from fd at file offset off for its page 0 */
int ua_engine_file(struct ua_engine *e, int id, int fd, uint64_t off);
/* Move up to cap/32 messages queued by completions (faults a READ or a
 * WRITE could not serve) to buf, in order; returns their number. */
int ua_engine_take(struct ua_engine *e, uint64_t buf, uint32_t cap);
/* engine operations (READs, WRITEs) whose completion has not come back */
int ua_engine_inflight(struct ua_engine *e);

/* Log the demand faults of region id (on != 0) or stop (0): each fault the
 * engine resolves there, or hands to a READ, appends a struct ua_touch, in
 * the order they are served; faults it passes up are not logged (Python
 * sees them).  A fault on a recording region when the log holds
 * UA_ENGINE_LOG_CAP entries is passed up (nothing is lost).  0 or -errno. */
int ua_engine_record(struct ua_engine *e, int id, int on);
/* Move up to max logged entries (oldest first) to out; returns how many. */
int ua_engine_touches(struct ua_engine *e, struct ua_touch *out, uint32_t max);

/* Pure pieces, exposed for tests: the window the region's read-ahead policy
 * gives a fault at page index rel (updates the adaptive state), and whether
 * page rel is marked resident (-ENOENT for an unknown id). */
int ua_engine_window(struct ua_engine *e, int id, uint64_t rel);
int ua_engine_resident(struct ua_engine *e, int id, uint64_t rel);
