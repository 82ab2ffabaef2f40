/* Native half of uffd_aio: a thin shim over liburing, the userfaultfd
 * ioctls, and memory helpers that run without the GIL.
 * Every function returns a value >= 0 or -errno; Python turns -errno
 * into OSError in uffd_aio/ring/_lowlevel.py. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/ioctl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
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
			r->eng_flags |= ua_engine_cqe(cqe->user_data, cqe->res);
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

int ua_ring_eng_link(struct ua_ring *r, struct ua_engine *e)
{
	if (r->neng == r->engcap) {
		int cap = r->engcap ? 2 * r->engcap : 4;
		struct ua_engine **n = realloc(r->engs, (size_t)cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		r->engs = n;
		r->engcap = cap;
	}
	r->engs[r->neng++] = e;
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
			ua_engine_ring_gone(r->engs[--r->neng]);
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
			r->eng_flags |= ua_engine_cqe(cqe->user_data, cqe->res);
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

int ua_mprotect(uint64_t addr, uint64_t len, int prot)
{
	return mprotect((void *)(uintptr_t)addr, len, prot) < 0 ? -errno : 0;
}

void ua_memcpy(uint64_t dst, uint64_t src, uint64_t len)
{
	memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, len);
}

#define PATTERN_MUL 0x9E3779B97F4A7C15ULL

uint64_t ua_pattern_word(uint64_t offset, uint64_t seed)
{
	return ((offset >> 3) * PATTERN_MUL) ^ seed;
}

void ua_fill_pattern(uint64_t addr, uint64_t len, uint64_t offset, uint64_t seed)
{
	uint64_t *w = (uint64_t *)(uintptr_t)addr;
	uint64_t acc = (offset >> 3) * PATTERN_MUL;
	uint64_t i, n = len >> 3;

	for (i = 0; i < n; i++) {
		w[i] = acc ^ seed;
		acc += PATTERN_MUL;
	}
}

int64_t ua_verify_pattern(uint64_t addr, uint64_t len, uint64_t offset, uint64_t seed)
{
	const volatile uint64_t *w = (const volatile uint64_t *)(uintptr_t)addr;
	uint64_t acc = (offset >> 3) * PATTERN_MUL;
	uint64_t i, n = len >> 3;

	for (i = 0; i < n; i++) {
		if (w[i] != (acc ^ seed))
			return (int64_t)(i << 3);
		acc += PATTERN_MUL;
	}
	return -1;
}

static inline int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

/* touch one page; returns a value so the compiler keeps the load */
static uint64_t touch_page(struct ua_scan *s, uint64_t page)
{
	uint64_t addr = s->addr + page * s->page_size;
	uint64_t off = s->offset + page * s->page_size;
	volatile uint64_t *w = (volatile uint64_t *)(uintptr_t)addr;

	switch (s->op) {
	case 0:
		return w[0];
	case 1:
		ua_fill_pattern(addr, s->page_size, off, s->seed);
		return 0;
	case 2:
		if (ua_verify_pattern(addr, s->page_size, off, s->seed) >= 0) {
			int64_t bad = (int64_t)(off + (uint64_t)ua_verify_pattern(addr, s->page_size,
										  off, s->seed));
			if (__atomic_fetch_add(&s->mismatches, 1, __ATOMIC_RELAXED) == 0)
				s->first_mismatch = bad;
		}
		return w[0];
	default:
		w[0] = ua_pattern_word(off, s->seed);
		return 0;
	}
}

static int catch_install(void);
static void catch_remove(void);
static int touch_page_catch(struct ua_scan *s, uint64_t page, uint64_t *sum);

struct scan_thread {
	struct ua_scan *s;
	int index;
	uint64_t sum;
};

static void *scan_main(void *arg)
{
	struct scan_thread *t = arg;
	struct ua_scan *s = t->s;
	uint64_t npages = s->len / s->page_size;
	uint64_t per = (npages + s->nthreads - 1) / s->nthreads;
	uint64_t first = per * t->index, last = first + per, i, n, *perm = NULL;

	if (first > npages)
		first = npages;
	if (last > npages)
		last = npages;
	n = last - first;
	if (s->order == 1 && n) {
		uint64_t rng = s->rng_seed + (uint64_t)t->index * 7919;

		perm = malloc(n * sizeof(*perm));
		if (!perm)
			return NULL;
		for (i = 0; i < n; i++)
			perm[i] = first + i;
		for (i = n - 1; i > 0; i--) {
			uint64_t j = splitmix(&rng) % (i + 1), tmp = perm[i];

			perm[i] = perm[j];
			perm[j] = tmp;
		}
	}
	for (i = 0; i < n && !s->stop; i++) {
		uint64_t page = perm ? perm[i] : first + i;
		int64_t t0 = s->lat_ns ? now_ns() : 0;

		if (!s->catch_sigbus) {
			t->sum += touch_page(s, page);
		} else if (touch_page_catch(s, page, &t->sum)) {
			__atomic_fetch_add(&s->sigbus, 1, __ATOMIC_RELAXED);
			if (__atomic_fetch_add(&s->mismatches, 1, __ATOMIC_RELAXED) == 0)
				s->first_mismatch = (int64_t)(s->offset + page * s->page_size);
		}
		if (s->lat_ns)
			s->lat_ns[page] = (uint64_t)(now_ns() - t0);
		__atomic_fetch_add(&s->progress, 1, __ATOMIC_RELAXED);
	}
	free(perm);
	return NULL;
}

int ua_scan_run(struct ua_scan *s)
{
	pthread_t *tids;
	struct scan_thread *ts;
	int i, started = 0, ret = 0;
	int64_t t0;

	if (s->nthreads < 1 || s->page_size == 0 || s->len % s->page_size)
		return -EINVAL;
	tids = calloc(s->nthreads, sizeof(*tids));
	ts = calloc(s->nthreads, sizeof(*ts));
	if (!tids || !ts) {
		free(tids);
		free(ts);
		return -ENOMEM;
	}
	s->first_mismatch = -1;
	s->catch_sigbus = 1;
	ret = catch_install();
	if (ret) {
		free(tids);
		free(ts);
		return ret;
	}
	t0 = now_ns();
	for (i = 0; i < s->nthreads; i++) {
		ts[i].s = s;
		ts[i].index = i;
		ret = -pthread_create(&tids[i], NULL, scan_main, &ts[i]);
		if (ret)
			break;
		started++;
	}
	s->checksum = 0;
	for (i = 0; i < started; i++) {
		pthread_join(tids[i], NULL);
		s->checksum += ts[i].sum;
	}
	s->wall_ns = now_ns() - t0;
	catch_remove();
	free(tids);
	free(ts);
	return ret;
}

/*
 * fork() without libc's fork locks.  glibc's fork() holds every malloc arena
 * lock and the stdio list lock across the fork system call, and with
 * UFFD_FEATURE_EVENT_FORK that call waits until the pager has read the FORK
 * event: an in-process pager whose loop thread mallocs in that window waits
 * for those locks (holding the GIL), and unless io_uring's task_work reads the
 * event for it (only when a read is armed), the fork waits for it forever.
 * _Fork() (glibc 2.34) takes no lock; the child only runs async-signal-safe
 * code (scan_main without a permutation does not allocate) and _exit()s.
 */
static pid_t fork_without_libc_locks(void)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
	return _Fork();
#else
	return (pid_t)syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0);
#endif
}

int ua_fork_touch(uint64_t addr, uint64_t len, uint64_t page_size, int op, uint64_t offset,
		  uint64_t seed)
{
	pid_t pid = fork_without_libc_locks();

	if (pid < 0)
		return -errno;
	if (pid == 0) {
		struct ua_scan s;

		/* a poisoned page must kill the child quietly: not through the parent's
		 * SIGBUS/SIGSEGV handlers (faulthandler would dump Python stacks) */
		signal(SIGBUS, SIG_DFL);
		signal(SIGSEGV, SIG_DFL);
		memset(&s, 0, sizeof(s));
		s.addr = addr;
		s.len = len;
		s.page_size = page_size;
		s.offset = offset;
		s.seed = seed;
		s.nthreads = 1;
		s.op = op;
		s.first_mismatch = -1;
		scan_main(&(struct scan_thread){ .s = &s, .index = 0 });
		_exit(s.mismatches ? 1 : 0);
	}
	return pid;
}

long ua_gettid(void) { return syscall(SYS_gettid); }

uint64_t ua_malloc_churn(uint64_t n)
{
	uint64_t i, sum = 0;

	for (i = 0; i < n; i++) {
		volatile char *p = malloc(2048 + (i % 7) * 1111);

		if (!p)
			break;
		p[0] = (char)i;
		sum += (unsigned char)p[0];
		free((void *)p);
	}
	return sum;
}

/* ---- reading pages that may raise SIGBUS (tests: poisoned pages) ----- */
/* volatile: the stores around memcpy() must not be optimized away */
static __thread sigjmp_buf *volatile catch_jmp;
static struct sigaction catch_old;
static pthread_mutex_t catch_lock = PTHREAD_MUTEX_INITIALIZER;
static int catch_users;

static void catch_handler(int sig, siginfo_t *si, void *uc)
{
	sigjmp_buf *jb = catch_jmp;

	if (jb) {
		catch_jmp = NULL;
		siglongjmp(*jb, 1);
	}
	/* another thread's SIGBUS: what was installed before us, else the default
	 * action (returning repeats the access, which then kills the process) */
	if (catch_old.sa_flags & SA_SIGINFO) {
		catch_old.sa_sigaction(sig, si, uc);
		return;
	}
	if (catch_old.sa_handler != SIG_DFL && catch_old.sa_handler != SIG_IGN) {
		catch_old.sa_handler(sig);
		return;
	}
	signal(sig, SIG_DFL);
}

static int catch_install(void)
{
	int rc = 0;

	pthread_mutex_lock(&catch_lock);
	if (catch_users++ == 0) {
		struct sigaction sa;

		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = catch_handler;
		sa.sa_flags = SA_SIGINFO | SA_NODEFER;
		sigemptyset(&sa.sa_mask);
		if (sigaction(SIGBUS, &sa, &catch_old) < 0) {
			rc = -errno;
			catch_users--;
		}
	}
	pthread_mutex_unlock(&catch_lock);
	return rc;
}

static void catch_remove(void)
{
	pthread_mutex_lock(&catch_lock);
	if (--catch_users == 0)
		sigaction(SIGBUS, &catch_old, NULL);
	pthread_mutex_unlock(&catch_lock);
}

/* 1 if copying this page raised SIGBUS */
static __attribute__((noinline)) int copy_page_catch(uint64_t dst, uint64_t src, uint64_t n)
{
	sigjmp_buf jb;

	if (sigsetjmp(jb, 1)) {
		memset((void *)(uintptr_t)dst, 0, n);
		return 1;
	}
	catch_jmp = &jb;
	memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
	catch_jmp = NULL;
	return 0;
}

/* 1 if touching this page raised SIGBUS; no signal mask saved (SA_NODEFER: the
 * handler leaves it unchanged), so the per-page cost stays a few instructions */
static __attribute__((noinline)) int touch_page_catch(struct ua_scan *s, uint64_t page,
						      uint64_t *sum)
{
	sigjmp_buf jb;

	if (sigsetjmp(jb, 0))
		return 1;
	catch_jmp = &jb;
	*sum += touch_page(s, page);
	catch_jmp = NULL;
	return 0;
}

int64_t ua_read_catch(uint64_t addr, uint64_t len, uint64_t page_size, uint64_t dst,
		      uint8_t *bus)
{
	uint64_t i, n;
	int64_t hits = 0;
	int rc;

	if (page_size == 0 || len % page_size)
		return -EINVAL;
	rc = catch_install();
	if (rc)
		return rc;
	n = len / page_size;
	for (i = 0; i < n; i++) {
		bus[i] = (uint8_t)copy_page_catch(dst + i * page_size, addr + i * page_size,
						  page_size);
		hits += bus[i];
	}
	catch_remove();
	return hits;
}

/* ---- stamp writers (tests: lost writes under eviction) --------------- */
#define STAMP_MUL 0xD6E8FEB86659FD93ULL

static inline uint64_t stamp_word(uint64_t page, uint64_t gen, uint64_t i)
{
	if (i == 0)
		return page;
	if (i == 1)
		return gen;
	return ((page << 24) ^ gen ^ (i << 48)) * STAMP_MUL;
}

void ua_stamp_fill(uint64_t addr, uint64_t page_size, uint64_t page, uint64_t gen)
{
	volatile uint64_t *w = (volatile uint64_t *)(uintptr_t)addr;
	uint64_t i, n = page_size >> 3;

	/* the generation word last: a torn page never verifies */
	for (i = 0; i < n; i++)
		if (i != 1)
			w[i] = stamp_word(page, gen, i);
	w[1] = gen;
}

struct stamp_thread {
	struct ua_stamp *s;
	int index;
};

static void *stamp_main(void *arg)
{
	struct stamp_thread *t = arg;
	struct ua_stamp *s = t->s;
	uint64_t rng = s->rng_seed + (uint64_t)t->index * 7919, n = 0, i, pass, *mine;

	mine = malloc((s->npages / (uint64_t)s->nthreads + 1) * sizeof(*mine));
	if (!mine)
		return NULL;
	for (i = (uint64_t)t->index; i < s->npages; i += (uint64_t)s->nthreads)
		mine[n++] = i;
	for (pass = 1; pass <= s->passes && !s->stop; pass++) {
		int shuffle = s->order == 1 || (s->order == 2 && (pass & 1) == 0);

		if (shuffle && n > 1) {
			for (i = n - 1; i > 0; i--) {
				uint64_t j = splitmix(&rng) % (i + 1), tmp = mine[i];

				mine[i] = mine[j];
				mine[j] = tmp;
			}
		} else if (!shuffle) {
			for (i = 0; i < n; i++)
				mine[i] = (uint64_t)t->index + i * (uint64_t)s->nthreads;
		}
		for (i = 0; i < n && !s->stop; i++) {
			uint64_t p = mine[i];

			ua_stamp_fill(s->addr + p * s->page_size, s->page_size, p, pass);
			__atomic_store_n(&s->gen[p], pass, __ATOMIC_RELEASE);
			__atomic_fetch_add(&s->progress, 1, __ATOMIC_RELAXED);
		}
	}
	free(mine);
	return NULL;
}

int ua_stamp_run(struct ua_stamp *s)
{
	pthread_t *tids;
	struct stamp_thread *ts;
	int i, started = 0, ret = 0;
	int64_t t0;

	if (s->nthreads < 1 || s->page_size < 16 || !s->gen)
		return -EINVAL;
	tids = calloc((size_t)s->nthreads, sizeof(*tids));
	ts = calloc((size_t)s->nthreads, sizeof(*ts));
	if (!tids || !ts) {
		free(tids);
		free(ts);
		return -ENOMEM;
	}
	t0 = now_ns();
	for (i = 0; i < s->nthreads; i++) {
		ts[i].s = s;
		ts[i].index = i;
		ret = -pthread_create(&tids[i], NULL, stamp_main, &ts[i]);
		if (ret)
			break;
		started++;
	}
	for (i = 0; i < started; i++)
		pthread_join(tids[i], NULL);
	s->wall_ns = now_ns() - t0;
	free(tids);
	free(ts);
	return ret;
}

int64_t ua_stamp_verify(uint64_t addr, uint64_t npages, uint64_t page_size,
			const uint64_t *gen, int64_t *bad)
{
	uint64_t p, i, n = page_size >> 3;
	int64_t first = -1;

	*bad = 0;
	for (p = 0; p < npages; p++) {
		const volatile uint64_t *w =
			(const volatile uint64_t *)(uintptr_t)(addr + p * page_size);

		for (i = 0; i < n; i++) {
			if (w[i] != stamp_word(p, gen[p], i)) {
				if (first < 0)
					first = (int64_t)p;
				(*bad)++;
				break;
			}
		}
	}
	return first;
}
