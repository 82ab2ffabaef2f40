/* Declarations shared by the cffi cdef (uffd_aio/testing/_build.py) and
 * helpers.c: the native helpers of uffd_aio.testing.  Plain C types only. */

/* ---- pattern (benchmarks/c/pattern.h has the same one) ---------------- */
uint64_t ua_pattern_word(uint64_t offset, uint64_t seed);
void ua_fill_pattern(uint64_t addr, uint64_t len, uint64_t offset, uint64_t seed);
int64_t ua_verify_pattern(uint64_t addr, uint64_t len, uint64_t offset, uint64_t seed);

/* Run nthreads native threads over [addr, addr+len): each touches its
 * share of pages (op 0 read, 1 write pattern, 2 verify pattern, 3 write
 * one word) in order 0 sequential (chunked) / 1 random; per-page latency
 * in ns into lat_ns[page] when given; *progress counts pages done. */
struct ua_scan {
    uint64_t addr, len, page_size, offset, seed;
    int nthreads, op, order;
    uint64_t rng_seed;
    uint64_t *lat_ns;
    volatile int64_t progress;
    volatile int64_t mismatches;
    int64_t first_mismatch;
    uint64_t checksum;
    int64_t wall_ns;
    volatile int stop;
    /* ua_scan_run: a page whose access raises SIGBUS (poisoned) is counted here
     * (and as a mismatch) instead of killing the process */
    volatile int64_t sigbus;
    int catch_sigbus;
};
int ua_scan_run(struct ua_scan *s);

/* fork a child that touches [addr, addr+len) (op as in ua_scan) and exits
 * 0 if all verified, 1 on mismatch; returns the child's pid or -errno */
int ua_fork_touch(uint64_t addr, uint64_t len, uint64_t page_size, int op,
                  uint64_t offset, uint64_t seed);
long ua_gettid(void);

/* Copy [addr, addr+len) page by page into dst, catching SIGBUS: bus[i] is 1 if
 * page i raised SIGBUS (its bytes in dst are zeros), else 0.  Returns the number
 * of pages that raised SIGBUS, or -errno.  The SIGBUS handler is installed
 * for the call (chaining to the previous one for other threads' signals). */
int64_t ua_read_catch(uint64_t addr, uint64_t len, uint64_t page_size, uint64_t dst,
                      uint8_t *bus);

/* Stamp writers: nthreads native threads write whole pages of
 * [addr, addr + npages * page_size); page p belongs to thread p % nthreads,
 * which writes it `passes` times (order 0 sequential, 1 random, 2 alternating),
 * stamping generation 1, 2, ... (ua_stamp_fill) and storing the generation
 * in gen[p] after each write.  ua_stamp_verify returns the first page whose
 * content is not its gen[p] stamp (-1: all good) and counts them in *bad. */
struct ua_stamp {
    uint64_t addr, npages, page_size;
    int nthreads, order;
    uint64_t passes, rng_seed;
    uint64_t *gen;
    volatile int64_t progress;
    volatile int stop;
    int64_t wall_ns;
};
int ua_stamp_run(struct ua_stamp *s);
void ua_stamp_fill(uint64_t addr, uint64_t page_size, uint64_t page, uint64_t gen);
int64_t ua_stamp_verify(uint64_t addr, uint64_t npages, uint64_t page_size,
                        const uint64_t *gen, int64_t *bad);
/* n malloc/free pairs of sizes past glibc's per-thread cache, so each takes an
 * arena lock (tests: the thread that allocates while another one forks) */
uint64_t ua_malloc_churn(uint64_t n);
