/* Native half of uffd_aio: a thin shim over liburing, the userfaultfd
 * ioctls and a few memory calls (mmap, madvise, memcpy...).  The helpers of
 * tests, examples and benchmarks (pattern, scan threads, fork_touch...) are a
 * separate extension: uffd_aio/testing/csrc/helpers.c.
 * Every function returns a value >= 0 or -errno; Python turns -errno
 * into OSError in uffd_aio/binding/lowlevel.py. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/ioctl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "native.h"
#include "ring_engine.h"

#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_OP_READ_MULTISHOT
#define IORING_OP_READ_MULTISHOT 49
#endif

/* ---- io_uring ------------------------------------------------------ */
struct ua_cqe_copy {
	uint64_t user_data;
	int32_t res;
	uint32_t flags;
};

struct ua_ring {
	struct io_uring ring;
	/* native engines using this ring (ring_engine.h) */
	struct ua_engine **engs;
	const struct ua_ring_eng_ops *eng_ops; /* set by the first engine linked */
	int neng, engcap;
	int eng_inflight;   /* engine SQEs whose CQE has not been routed yet */
	uint32_t eng_flags; /* UA_ENG_FLAG_*, read and cleared by ua_ring_engine_flags */
	/* CQEs reaped by ua_ring_eng_settle for ua_reap (in order) */
	struct ua_cqe_copy *stash;
	unsigned nstash, stash_head, stashcap;
};

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* route every ready CQE: the engine's to their engine, the others into the
 * stash (keep) or nowhere (the ring is being freed) */
static void eng_drain(struct ua_ring *r, int keep)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;

	if (IO_URING_READ_ONCE(*r->ring.sq.kflags) & IORING_SQ_CQ_OVERFLOW)
		io_uring_get_events(&r->ring);
	io_uring_for_each_cqe(&r->ring, head, cqe) {
		n++;
		if (cqe->user_data & UA_ENGINE_UD_TAG) {
			r->eng_inflight--;
			r->eng_flags |= r->eng_ops->cqe(cqe->user_data, cqe->res);
			continue;
		}
		if (!keep)
			continue;
		if (r->nstash == r->stashcap) {
			unsigned cap = r->stashcap ? 2 * r->stashcap : 64;
			struct ua_cqe_copy *s = realloc(r->stash, cap * sizeof(*s));

			if (!s) /* cannot keep it: its owner will never hear of it */
				continue;
			r->stash = s;
			r->stashcap = cap;
		}
		r->stash[r->nstash].user_data = cqe->user_data;
		r->stash[r->nstash].res = cqe->res;
		r->stash[r->nstash].flags = cqe->flags;
		r->nstash++;
	}
	if (n)
		io_uring_cq_advance(&r->ring, n);
}

int ua_ring_eng_prep(struct ua_ring *r, int op, int fd, uint64_t addr, uint32_t len,
		     uint64_t off, uint64_t user_data)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);

	if (!sqe) {
		io_uring_submit(&r->ring);
		sqe = io_uring_get_sqe(&r->ring);
		if (!sqe)
			return -EBUSY;
	}
	io_uring_prep_rw(op, sqe, fd, (const void *)(uintptr_t)addr, len, off);
	io_uring_sqe_set_data64(sqe, user_data | UA_ENGINE_UD_TAG);
	r->eng_inflight++;
	return 0;
}

int ua_ring_eng_submit(struct ua_ring *r) { return io_uring_submit(&r->ring); }

int ua_ring_eng_link(struct ua_ring *r, struct ua_engine *e, const struct ua_ring_eng_ops *ops)
{
	if (r->eng_ops && r->eng_ops != ops)
		return -EINVAL;
	if (r->neng == r->engcap) {
		int cap = r->engcap ? 2 * r->engcap : 4;
		struct ua_engine **n = realloc(r->engs, (size_t)cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		r->engs = n;
		r->engcap = cap;
	}
	r->engs[r->neng++] = e;
	r->eng_ops = ops;
	return 0;
}

void ua_ring_eng_unlink(struct ua_ring *r, struct ua_engine *e)
{
	int i;

	for (i = 0; i < r->neng; i++)
		if (r->engs[i] == e) {
			r->engs[i] = r->engs[--r->neng];
			return;
		}
}

int ua_ring_eng_settle(struct ua_ring *r, int (*pending)(void *), void *arg, int timeout_ms)
{
	int64_t deadline = mono_ms() + timeout_ms;

	io_uring_submit(&r->ring);
	for (;;) {
		struct __kernel_timespec ts = { 0, 10 * 1000000 };
		struct io_uring_cqe *cqe;
		int rc;

		eng_drain(r, 1);
		if (!pending(arg))
			return 0;
		if (mono_ms() >= deadline)
			return -ETIMEDOUT;
		rc = io_uring_wait_cqe_timeout(&r->ring, &cqe, &ts);
		if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN)
			return rc;
	}
}

static int any_engine_op(void *arg)
{
	return ((struct ua_ring *)arg)->eng_inflight > 0;
}

uint32_t ua_ring_engine_flags(struct ua_ring *r)
{
	uint32_t f = r->eng_flags;

	r->eng_flags = 0;
	return f;
}

unsigned ua_ring_sq_ready(struct ua_ring *r) { return io_uring_sq_ready(&r->ring); }

struct ua_ring *ua_ring_new(unsigned entries, uint32_t flags, uint32_t sq_thread_idle,
			    int *err, uint32_t *out_flags, uint32_t *out_features)
{
	struct ua_ring *r = calloc(1, sizeof(*r));
	struct io_uring_params p;
	int ret;

	if (!r) {
		*err = -ENOMEM;
		return NULL;
	}
	memset(&p, 0, sizeof(p));
	p.flags = flags;
	p.sq_thread_idle = sq_thread_idle;
	ret = io_uring_queue_init_params(entries, &r->ring, &p);
	if (ret < 0) {
		free(r);
		*err = ret;
		return NULL;
	}
	*err = 0;
	*out_flags = p.flags;
	*out_features = p.features;
	return r;
}

void ua_ring_free(struct ua_ring *r)
{
	if (r) {
		/* engine READs write into engine buffers: let them finish (bounded),
		 * then tell the engines the ring is gone (a dying engine with an
		 * operation still out is leaked rather than freed under the kernel) */
		if (r->eng_inflight > 0)
			ua_ring_eng_settle(r, any_engine_op, r, 1000);
		while (r->neng > 0)
			r->eng_ops->ring_gone(r->engs[--r->neng]);
		free(r->engs);
		free(r->stash);
		io_uring_queue_exit(&r->ring);
		free(r);
	}
}

int ua_ring_fd(struct ua_ring *r) { return r->ring.ring_fd; }
unsigned ua_ring_sq_space(struct ua_ring *r) { return io_uring_sq_space_left(&r->ring); }
int ua_ring_submit(struct ua_ring *r) { return io_uring_submit(&r->ring); }

int ua_ring_probe(struct ua_ring *r, uint8_t *supported, int nops)
{
	struct io_uring_probe *probe = io_uring_get_probe_ring(&r->ring);
	int i;

	if (!probe)
		return -ENOSYS;
	for (i = 0; i < nops; i++)
		supported[i] = io_uring_opcode_supported(probe, i) ? 1 : 0;
	io_uring_free_probe(probe);
	return 0;
}

static inline struct io_uring_sqe *get_sqe(struct ua_ring *r, uint64_t user_data)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);

	if (sqe)
		io_uring_sqe_set_data64(sqe, user_data);
	return sqe;
}

int ua_prep_rw(struct ua_ring *r, int op, int fd, uint64_t addr, uint32_t len,
	       uint64_t off, uint64_t user_data, uint8_t sqe_flags, int buf_index)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_rw(op, sqe, fd, (const void *)(uintptr_t)addr, len, off);
	sqe->flags = sqe_flags;
	if (buf_index >= 0)
		sqe->buf_index = (uint16_t)buf_index;
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

int ua_prep_read_multishot(struct ua_ring *r, int fd, uint32_t len, uint64_t off,
			   uint16_t buf_group, uint64_t user_data)
{
	struct io_uring_sqe *sqe = get_sqe(r, user_data);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_rw(IORING_OP_READ_MULTISHOT, sqe, fd, NULL, len, off);
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = buf_group;
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

int ua_prep_poll(struct ua_ring *r, int fd, uint32_t mask, uint64_t user_data)
{
	struct io_uring_sqe *sqe = get_sqe(r, user_data);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_add(sqe, fd, mask);
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

int ua_prep_cancel(struct ua_ring *r, uint64_t target, uint64_t user_data)
{
	struct io_uring_sqe *sqe = get_sqe(r, user_data);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_cancel64(sqe, target, 0);
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

int ua_prep_nop(struct ua_ring *r, uint64_t user_data)
{
	struct io_uring_sqe *sqe = get_sqe(r, user_data);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_nop(sqe);
	io_uring_sqe_set_data64(sqe, user_data);
	return 0;
}

unsigned ua_reap(struct ua_ring *r, uint64_t *user_data, int32_t *res, uint32_t *flags,
		 unsigned max)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0, seen = 0;

	/* first what ua_ring_eng_settle reaped for us */
	while (r->stash_head < r->nstash && n < max) {
		struct ua_cqe_copy *c = &r->stash[r->stash_head++];

		user_data[n] = c->user_data;
		res[n] = c->res;
		flags[n] = c->flags;
		n++;
	}
	if (r->stash_head == r->nstash)
		r->stash_head = r->nstash = 0;
	/* CQEs that overflowed the CQ ring wait in the kernel until an enter
	 * flushes them; without this a burst larger than the CQ stalls. */
	if (IO_URING_READ_ONCE(*r->ring.sq.kflags) & IORING_SQ_CQ_OVERFLOW)
		io_uring_get_events(&r->ring);
	io_uring_for_each_cqe(&r->ring, head, cqe) {
		if (n == max)
			break;
		seen++;
		if (cqe->user_data & UA_ENGINE_UD_TAG) { /* the engine's: served here */
			r->eng_inflight--;
			r->eng_flags |= r->eng_ops->cqe(cqe->user_data, cqe->res);
			continue;
		}
		user_data[n] = cqe->user_data;
		res[n] = cqe->res;
		flags[n] = cqe->flags;
		n++;
	}
	if (seen)
		io_uring_cq_advance(&r->ring, seen);
	return n;
}

int ua_register_buffers(struct ua_ring *r, const uint64_t *addrs, const uint64_t *lens,
			unsigned n)
{
	struct iovec *iov = calloc(n ? n : 1, sizeof(*iov));
	unsigned i;
	int ret;

	if (!iov)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		iov[i].iov_base = (void *)(uintptr_t)addrs[i];
		iov[i].iov_len = lens[i];
	}
	ret = io_uring_register_buffers(&r->ring, iov, n);
	free(iov);
	return ret;
}

int ua_unregister_buffers(struct ua_ring *r) { return io_uring_unregister_buffers(&r->ring); }

int ua_register_files(struct ua_ring *r, const int *fds, unsigned n)
{
	return io_uring_register_files(&r->ring, fds, n);
}

int ua_unregister_files(struct ua_ring *r) { return io_uring_unregister_files(&r->ring); }

struct ua_bufring {
	struct io_uring_buf_ring *br;
	size_t br_len;
	char *bufs;
	unsigned nbufs, size, mask;
	uint16_t bgid;
};

struct ua_bufring *ua_bufring_new(struct ua_ring *r, uint16_t bgid, unsigned nbufs,
				  unsigned size, int *err)
{
	struct io_uring_buf_reg reg;
	struct ua_bufring *b;
	unsigned i;
	int ret;

	if (nbufs == 0 || (nbufs & (nbufs - 1)) || nbufs > 32768) {
		*err = -EINVAL;
		return NULL;
	}
	b = calloc(1, sizeof(*b));
	if (!b) {
		*err = -ENOMEM;
		return NULL;
	}
	b->br_len = (size_t)nbufs * sizeof(struct io_uring_buf);
	b->br = mmap(NULL, b->br_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	b->bufs = malloc((size_t)nbufs * size);
	if (b->br == MAP_FAILED || !b->bufs) {
		if (b->br != MAP_FAILED)
			munmap(b->br, b->br_len);
		free(b->bufs);
		free(b);
		*err = -ENOMEM;
		return NULL;
	}
	io_uring_buf_ring_init(b->br);
	memset(&reg, 0, sizeof(reg));
	reg.ring_addr = (uint64_t)(uintptr_t)b->br;
	reg.ring_entries = nbufs;
	reg.bgid = bgid;
	ret = io_uring_register_buf_ring(&r->ring, &reg, 0);
	if (ret) {
		munmap(b->br, b->br_len);
		free(b->bufs);
		free(b);
		*err = ret;
		return NULL;
	}
	b->nbufs = nbufs;
	b->size = size;
	b->mask = io_uring_buf_ring_mask(nbufs);
	b->bgid = bgid;
	for (i = 0; i < nbufs; i++)
		io_uring_buf_ring_add(b->br, b->bufs + (size_t)i * size, size, i, b->mask, i);
	io_uring_buf_ring_advance(b->br, nbufs);
	*err = 0;
	return b;
}

void ua_bufring_free(struct ua_ring *r, struct ua_bufring *b)
{
	if (!b)
		return;
	if (r)
		io_uring_unregister_buf_ring(&r->ring, b->bgid);
	munmap(b->br, b->br_len);
	free(b->bufs);
	free(b);
}

uint64_t ua_bufring_addr(struct ua_bufring *b, unsigned bid)
{
	return (uint64_t)(uintptr_t)(b->bufs + (size_t)bid * b->size);
}

void ua_bufring_recycle(struct ua_bufring *b, unsigned bid)
{
	io_uring_buf_ring_add(b->br, b->bufs + (size_t)bid * b->size, b->size, bid, b->mask, 0);
	io_uring_buf_ring_advance(b->br, 1);
}

/* ---- userfaultfd ABI (spelled out: see native.h) --------------------- */
struct ua_range { uint64_t start, len; };
struct ua_api { uint64_t api, features, ioctls; };
struct ua_register { struct ua_range range; uint64_t mode, ioctls; };
struct ua_copy { uint64_t dst, src, len, mode; int64_t copy; };
struct ua_zeropage { struct ua_range range; uint64_t mode; int64_t zeropage; };
struct ua_move { uint64_t dst, src, len, mode; int64_t move; };
struct ua_writeprotect { struct ua_range range; uint64_t mode; };
struct ua_continue { struct ua_range range; uint64_t mode; int64_t mapped; };
struct ua_poison { struct ua_range range; uint64_t mode; int64_t updated; };

#define UA_UFFDIO 0xAA
#define UA_UFFD_API 0xAA
#define UA_IOC_API _IOWR(UA_UFFDIO, 0x3F, struct ua_api)
#define UA_IOC_REGISTER _IOWR(UA_UFFDIO, 0x00, struct ua_register)
#define UA_IOC_UNREGISTER _IOR(UA_UFFDIO, 0x01, struct ua_range)
#define UA_IOC_WAKE _IOR(UA_UFFDIO, 0x02, struct ua_range)
#define UA_IOC_COPY _IOWR(UA_UFFDIO, 0x03, struct ua_copy)
#define UA_IOC_ZEROPAGE _IOWR(UA_UFFDIO, 0x04, struct ua_zeropage)
#define UA_IOC_MOVE _IOWR(UA_UFFDIO, 0x05, struct ua_move)
#define UA_IOC_WRITEPROTECT _IOWR(UA_UFFDIO, 0x06, struct ua_writeprotect)
#define UA_IOC_CONTINUE _IOWR(UA_UFFDIO, 0x07, struct ua_continue)
#define UA_IOC_POISON _IOWR(UA_UFFDIO, 0x08, struct ua_poison)
/* added by the uffd_aio kernel series (kernel_patches/uapi.md); absent
 * from every distro header, so always spelled out here */
struct ua_write_fd { uint64_t flags; int64_t fd; };
struct ua_poll { uint64_t budget_ns, old_budget_ns; };
#define UA_IOC_WRITE_FD _IOWR(UA_UFFDIO, 0x09, struct ua_write_fd)
#define UA_IOC_POLL _IOWR(UA_UFFDIO, 0x0A, struct ua_poll)
#define UA_USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)

int ua_uffd_open(int flags, int *via_dev)
{
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	int fd, dev_errno = 0;

	if (dev >= 0) {
		fd = ioctl(dev, UA_USERFAULTFD_IOC_NEW, flags);
		dev_errno = errno;
		close(dev);
		if (fd >= 0) {
			*via_dev = 1;
			return fd;
		}
	} else {
		dev_errno = errno;
	}
	*via_dev = 0;
	fd = (int)syscall(SYS_userfaultfd, flags);
	if (fd >= 0)
		return fd;
	/* report the more telling of the two failures */
	return errno == EPERM && dev_errno != ENOENT ? -dev_errno : -errno;
}

#define IOCTL_OR_ERRNO(fd, req, arg) (ioctl((fd), (req), (arg)) < 0 ? -errno : 0)

int ua_uffd_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls)
{
	struct ua_api a = { .api = UA_UFFD_API, .features = features };
	int ret = IOCTL_OR_ERRNO(fd, UA_IOC_API, &a);

	*out_features = a.features;
	*out_ioctls = a.ioctls;
	return ret;
}

int ua_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls)
{
	struct ua_register r = { .range = { start, len }, .mode = mode };
	int ret = IOCTL_OR_ERRNO(fd, UA_IOC_REGISTER, &r);

	*ioctls = r.ioctls;
	return ret;
}

int ua_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct ua_range r = { start, len };

	return IOCTL_OR_ERRNO(fd, UA_IOC_UNREGISTER, &r);
}

int ua_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct ua_range r = { start, len };

	return IOCTL_OR_ERRNO(fd, UA_IOC_WAKE, &r);
}

int ua_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
	struct ua_copy c = { .dst = dst, .src = src, .len = len, .mode = mode };
	int ret = IOCTL_OR_ERRNO(fd, UA_IOC_COPY, &c);

	*done = c.copy;
	return ret;
}

/* The fault path's UFFDIO_COPY (issue 12): the source is the caller's buffer (a cffi
 * from_buffer handle passed straight through) and only rc comes back, so a call needs
 * no per-call cffi allocation (no int64_t *done) and no address cast; 0 or -errno. */
int ua_uffd_copy_buf(int fd, uint64_t dst, const char *src, uint64_t len, uint64_t mode)
{
	struct ua_copy c = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = mode };

	return IOCTL_OR_ERRNO(fd, UA_IOC_COPY, &c);
}

/* Working-set replay (issue 14): UFFDIO_COPY of n runs in one call (the GIL is released
 * for all of them).  runs[3i] = dst, runs[3i+1] = src, runs[3i+2] = len (page_size
 * multiples).  Partial copies are continued, EEXIST pages skipped (a fault got there
 * first), a run refused with EAGAIN (the address space is changing) is left to the
 * faults.  out[0] pages placed, out[1] pages already there, out[2] pages left (EAGAIN),
 * out[3] ioctls, out[4] the index of the run that failed.  Returns n, or the -errno that
 * ended the batch at run out[4] (ENOENT/ESRCH: range or process gone, EBADF...). */
int ua_uffd_copy_runs(int fd, const uint64_t *runs, uint32_t n, uint64_t page_size,
		      uint64_t *out)
{
	out[0] = out[1] = out[2] = out[3] = out[4] = 0;
	if (!page_size)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t dst = runs[3 * i], src = runs[3 * i + 1], len = runs[3 * i + 2];
		uint64_t done = 0;

		while (done < len) {
			struct ua_copy c = { .dst = dst + done, .src = src + done,
					     .len = len - done, .mode = 0 };
			int ret = IOCTL_OR_ERRNO(fd, UA_IOC_COPY, &c);

			out[3]++;
			if (!ret) {
				out[0] += (len - done) / page_size;
				break;
			}
			if (c.copy > 0) {
				out[0] += (uint64_t)c.copy / page_size;
				done += (uint64_t)c.copy;
				continue;
			}
			if (ret == -EEXIST) {
				out[1]++;
				done += page_size;
				continue;
			}
			if (ret == -EAGAIN) {
				out[2] += (len - done) / page_size;
				break;
			}
			out[4] = i;
			return ret;
		}
	}
	out[4] = n;
	return (int)n;
}

/* The same for n sorted page indexes: page p goes from src + p * page_size to
 * dst + p * page_size; consecutive pages are copied as one run (one ioctl).  out[] as
 * above, out[4] the index in pages[] where an error stopped the batch. */
int ua_uffd_copy_pages(int fd, uint64_t dst, uint64_t src, uint64_t page_size,
		       const uint32_t *pages, uint32_t n, uint64_t *out)
{
	uint64_t total[4] = { 0 };

	for (uint32_t i = 0; i < n;) {
		uint32_t j = i + 1;
		uint64_t run[3];
		int ret;

		while (j < n && pages[j] == pages[j - 1] + 1)
			j++;
		run[0] = dst + (uint64_t)pages[i] * page_size;
		run[1] = src + (uint64_t)pages[i] * page_size;
		run[2] = (uint64_t)(j - i) * page_size;
		ret = ua_uffd_copy_runs(fd, run, 1, page_size, out);
		for (int k = 0; k < 4; k++)
			total[k] += out[k];
		if (ret < 0) {
			memcpy(out, total, sizeof(total));
			out[4] = i;
			return ret;
		}
		i = j;
	}
	memcpy(out, total, sizeof(total));
	out[4] = n;
	return (int)n;
}

int ua_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct ua_zeropage z = { .range = { start, len }, .mode = mode };
	int ret = IOCTL_OR_ERRNO(fd, UA_IOC_ZEROPAGE, &z);

	*done = z.zeropage;
	return ret;
}

int ua_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct ua_continue c = { .range = { start, len }, .mode = mode };
	int ret = IOCTL_OR_ERRNO(fd, UA_IOC_CONTINUE, &c);

	*done = c.mapped;
	return ret;
}

int ua_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct ua_poison p = { .range = { start, len }, .mode = mode };
	int ret = IOCTL_OR_ERRNO(fd, UA_IOC_POISON, &p);

	*done = p.updated;
	return ret;
}

int ua_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
	struct ua_move m = { .dst = dst, .src = src, .len = len, .mode = mode };
	int ret = IOCTL_OR_ERRNO(fd, UA_IOC_MOVE, &m);

	*done = m.move;
	return ret;
}

int ua_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct ua_writeprotect w = { .range = { start, len }, .mode = mode };

	return IOCTL_OR_ERRNO(fd, UA_IOC_WRITEPROTECT, &w);
}

int ua_uffd_write_fd(int fd, uint64_t flags)
{
	struct ua_write_fd w = { .flags = flags, .fd = -1 };

	if (ioctl(fd, UA_IOC_WRITE_FD, &w) < 0)
		return -errno;
	return (int)w.fd;
}

int ua_uffd_poll(int fd, uint64_t budget_ns, uint64_t *old_budget_ns)
{
	struct ua_poll p = { .budget_ns = budget_ns };
	int ret = IOCTL_OR_ERRNO(fd, UA_IOC_POLL, &p);

	*old_budget_ns = p.old_budget_ns;
	return ret;
}

int ua_pwrite(int fd, uint64_t buf, uint64_t len, uint64_t pos, int64_t *done)
{
	ssize_t n = pwrite(fd, (const void *)(uintptr_t)buf, len, (off_t)pos);

	*done = n;
	return n < 0 ? -errno : 0;
}

/* ---- memory -------------------------------------------------------- */
int64_t ua_mmap(uint64_t addr, uint64_t len, int prot, int flags, int fd, int64_t off)
{
	void *p = mmap((void *)(uintptr_t)addr, len, prot, flags, fd, off);

	return p == MAP_FAILED ? -errno : (int64_t)(uintptr_t)p;
}

int ua_munmap(uint64_t addr, uint64_t len)
{
	return munmap((void *)(uintptr_t)addr, len) < 0 ? -errno : 0;
}

int64_t ua_mremap(uint64_t old, uint64_t old_len, uint64_t new_len, int flags, uint64_t new_addr)
{
	void *p = mremap((void *)(uintptr_t)old, old_len, new_len, flags, (void *)(uintptr_t)new_addr);

	return p == MAP_FAILED ? -errno : (int64_t)(uintptr_t)p;
}

int ua_madvise(uint64_t addr, uint64_t len, int advice)
{
	return madvise((void *)(uintptr_t)addr, len, advice) < 0 ? -errno : 0;
}

int ua_mincore(uint64_t addr, uint64_t len, unsigned char *vec)
{
	/* never blocks and never faults the mapping in (the engine's page-cache check) */
	return mincore((void *)(uintptr_t)addr, len, vec) < 0 ? -errno : 0;
}

int ua_mprotect(uint64_t addr, uint64_t len, int prot)
{
	return mprotect((void *)(uintptr_t)addr, len, prot) < 0 ? -errno : 0;
}

void ua_memcpy(uint64_t dst, uint64_t src, uint64_t len)
{
	memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, len);
}
