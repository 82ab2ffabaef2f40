/* Native helpers for tests, examples and benchmarks (uffd_aio.testing): the
 * pattern content, native threads that touch, verify or stamp memory without
 * the GIL, fork_touch, SIGBUS-catching reads.  Built as the cffi extension
 * uffd_aio.testing._helpers, apart from the product's uffd_aio.binding._native:
 * nothing here runs in the pager.  Functions return a value >= 0 or -errno;
 * uffd_aio/testing/_lowlevel.py turns -errno into OSError. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "helpers.h"

/* ---- pattern --------------------------------------------------------- */
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
