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

/* ---- memory (the GIL is released for every call) ------------------------ */
int64_t ua_mmap(uint64_t addr, uint64_t len, int prot, int flags, int fd, int64_t off);
int ua_munmap(uint64_t addr, uint64_t len);
int64_t ua_mremap(uint64_t old, uint64_t old_len, uint64_t new_len, int flags, uint64_t new_addr);
int ua_madvise(uint64_t addr, uint64_t len, int advice);
/* mincore(2): one byte per page of [addr, addr+len) in vec, bit 0 = in the page cache */
int ua_mincore(uint64_t addr, uint64_t len, unsigned char *vec);
int ua_mprotect(uint64_t addr, uint64_t len, int prot);
void ua_memcpy(uint64_t dst, uint64_t src, uint64_t len);
