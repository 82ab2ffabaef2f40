/* Declarations shared by the cffi cdef and native.c.  Everything here is
 * plain C types so that the cdef does not need the kernel or liburing
 * headers: the uffd ABI is spelled out in native.c with our own structs,
 * because Debian 12's linux-libc-dev (6.1) lacks MOVE, POISON, WP_ASYNC. */

/* ---- io_uring ------------------------------------------------------ */
struct ua_ring;                                 /* wraps struct io_uring */

struct ua_ring *ua_ring_new(unsigned entries, uint32_t flags, uint32_t sq_thread_idle,
                            int *err, uint32_t *out_flags, uint32_t *out_features);
void ua_ring_free(struct ua_ring *r);
int ua_ring_fd(struct ua_ring *r);
unsigned ua_ring_sq_space(struct ua_ring *r);
int ua_ring_submit(struct ua_ring *r);
int ua_ring_probe(struct ua_ring *r, uint8_t *supported, int nops);

/* prep helpers: return 0, or -EBUSY when the SQ is full (caller submits
 * and retries).  op is an IORING_OP_* number. */
int ua_prep_rw(struct ua_ring *r, int op, int fd, uint64_t addr, uint32_t len,
               uint64_t off, uint64_t user_data, uint8_t sqe_flags, int buf_index);
int ua_prep_read_multishot(struct ua_ring *r, int fd, uint32_t len, uint64_t off,
                           uint16_t buf_group, uint64_t user_data);
int ua_prep_poll(struct ua_ring *r, int fd, uint32_t mask, uint64_t user_data);
int ua_prep_cancel(struct ua_ring *r, uint64_t target, uint64_t user_data);
int ua_prep_nop(struct ua_ring *r, uint64_t user_data);

/* reap up to max CQEs into three parallel arrays; returns the count */
unsigned ua_reap(struct ua_ring *r, uint64_t *user_data, int32_t *res,
                 uint32_t *flags, unsigned max);
/* native engine on this ring (engine.h): CQEs with the engine's tag bit are
 * served in C by ua_reap; these flags (bit 0: an engine queued messages for
 * Python, see ua_engine_take) are read and cleared here */
uint32_t ua_ring_engine_flags(struct ua_ring *r);
/* SQEs prepared and not submitted yet (the engine's included) */
unsigned ua_ring_sq_ready(struct ua_ring *r);

int ua_register_buffers(struct ua_ring *r, const uint64_t *addrs, const uint64_t *lens,
                        unsigned n);
int ua_unregister_buffers(struct ua_ring *r);
int ua_register_files(struct ua_ring *r, const int *fds, unsigned n);
int ua_unregister_files(struct ua_ring *r);

/* provided-buffer ring for multishot reads: nbufs (power of 2) of size bytes */
struct ua_bufring;
struct ua_bufring *ua_bufring_new(struct ua_ring *r, uint16_t bgid, unsigned nbufs,
                                  unsigned size, int *err);
void ua_bufring_free(struct ua_ring *r, struct ua_bufring *b);
uint64_t ua_bufring_addr(struct ua_bufring *b, unsigned bid);
void ua_bufring_recycle(struct ua_bufring *b, unsigned bid);

/* ---- userfaultfd ----------------------------------------------------- */
int ua_uffd_open(int flags, int *via_dev);
int ua_uffd_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls);
int ua_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int ua_uffd_unregister(int fd, uint64_t start, uint64_t len);
int ua_uffd_wake(int fd, uint64_t start, uint64_t len);
int ua_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);
int ua_uffd_copy_buf(int fd, uint64_t dst, const char *src, uint64_t len, uint64_t mode);
/* n UFFDIO_COPY runs (dst, src, len triples) in one call; see native.c */
int ua_uffd_copy_runs(int fd, const uint64_t *runs, uint32_t n, uint64_t page_size,
		      uint64_t *out);
/* UFFDIO_COPY of n sorted page indexes (consecutive ones as one run); see native.c */
int ua_uffd_copy_pages(int fd, uint64_t dst, uint64_t src, uint64_t page_size,
		       const uint32_t *pages, uint32_t n, uint64_t *out);
int ua_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int ua_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int ua_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int ua_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);
int ua_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int ua_pwrite(int fd, uint64_t buf, uint64_t len, uint64_t pos, int64_t *done);
/* patched kernels (kernel_patches/uapi.md): UFFDIO_WRITE_FD returns a new
 * writable fd for the same context, or -errno (stock kernel: -EINVAL);
 * UFFDIO_POLL sets the spin budget in ns and stores the previous one */
int ua_uffd_write_fd(int fd, uint64_t flags);
int ua_uffd_poll(int fd, uint64_t budget_ns, uint64_t *old_budget_ns);

/* ---- memory (GIL-free helpers for tests, examples, benchmarks) -------- */
int64_t ua_mmap(uint64_t addr, uint64_t len, int prot, int flags, int fd, int64_t off);
int ua_munmap(uint64_t addr, uint64_t len);
int64_t ua_mremap(uint64_t old, uint64_t old_len, uint64_t new_len, int flags, uint64_t new_addr);
int ua_madvise(uint64_t addr, uint64_t len, int advice);
int ua_mprotect(uint64_t addr, uint64_t len, int prot);
void ua_memcpy(uint64_t dst, uint64_t src, uint64_t len);
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
