#define _GNU_SOURCE
#include "handler.h"
#include "pattern.h"
#include "common.h"

#include <errno.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define UFFD_MSG_BATCH 64

/* ---------------------------------------------------------------- parsing */

static const char *skip_ws(const char *p, const char *e)
{
	while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

int alloc_bitmaps(struct bench_mapping *m, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		m[i].npages = m[i].size / m[i].page_size;
		m[i].served = calloc((m[i].npages + 63) / 64 + 1, sizeof(uint64_t));
		if (!m[i].served)
			return -1;
	}
	return 0;
}

void free_mappings(struct bench_mapping *m, size_t n)
{
	if (!m)
		return;
	for (size_t i = 0; i < n; i++)
		free(m[i].served);
	free(m);
}

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); goto fail; } while (0)

int parse_mappings(const char *json, size_t len, struct bench_mapping **out, size_t *n,
		   char *err, size_t errlen)
{
	const char *p = json, *e = json + len;
	struct bench_mapping *m = NULL;
	size_t cnt = 0, cap = 0;

	p = skip_ws(p, e);
	if (p >= e || *p++ != '[')
		FAIL("expected '['");
	for (;;) {
		/* one object per iteration */
		uint64_t base = 0, size = 0, offset = 0, ps = 0, pskib = 0;
		unsigned seen = 0;

		p = skip_ws(p, e);
		if (p < e && *p == ']' && cnt == 0) {
			p++;
			break;
		}
		if (p >= e || *p++ != '{')
			FAIL("expected '{' at byte %zu", (size_t)(p - json));
		for (;;) {
			const char *k;
			size_t kl;
			uint64_t v = 0;
			int isnum = 0;

			p = skip_ws(p, e);
			if (p < e && *p == '}') {
				p++;
				break;
			}
			if (p >= e || *p++ != '"')
				FAIL("expected a key at byte %zu", (size_t)(p - json));
			k = p;
			while (p < e && *p != '"')
				p++;
			if (p >= e)
				FAIL("unterminated key");
			kl = (size_t)(p - k);
			p = skip_ws(p + 1, e);
			if (p >= e || *p++ != ':')
				FAIL("expected ':' after key");
			p = skip_ws(p, e);
			if (p < e && *p == '"') { /* string value of an unknown key: skip */
				p++;
				while (p < e && *p != '"') {
					if (*p == '\\')
						p++;
					p++;
				}
				if (p >= e)
					FAIL("unterminated string value");
				p++;
			} else {
				while (p < e && *p >= '0' && *p <= '9') {
					if (v > (UINT64_MAX - 9) / 10)
						FAIL("number too large");
					v = v * 10 + (uint64_t)(*p++ - '0');
					isnum = 1;
				}
				if (!isnum)
					FAIL("expected an unsigned number at byte %zu", (size_t)(p - json));
			}
#define KEY(s) (kl == sizeof(s) - 1 && !memcmp(k, s, kl))
			if (isnum && KEY("base_host_virt_addr")) { base = v; seen |= 1; }
			else if (isnum && KEY("size")) { size = v; seen |= 2; }
			else if (isnum && KEY("offset")) { offset = v; seen |= 4; }
			else if (isnum && KEY("page_size")) { ps = v; seen |= 8; }
			else if (isnum && KEY("page_size_kib")) { pskib = v; seen |= 16; }
#undef KEY
			p = skip_ws(p, e);
			if (p < e && *p == ',') {
				p++;
				continue;
			}
			if (p < e && *p == '}') {
				p++;
				break;
			}
			FAIL("expected ',' or '}' at byte %zu", (size_t)(p - json));
		}
		if ((seen & 7) != 7)
			FAIL("mapping %zu lacks base_host_virt_addr/size/offset", cnt);
		if (!(seen & 8))
			ps = pskib; /* legacy field, holds bytes despite its name */
		if (!ps || (ps & (ps - 1)) || ps < 4096)
			FAIL("mapping %zu: bad page size %" PRIu64, cnt, ps);
		if (!size || size % ps || base % ps || offset % 8)
			FAIL("mapping %zu: size/base not page aligned", cnt);
		if (cnt == cap) {
			struct bench_mapping *nm;

			cap = cap ? cap * 2 : 8;
			nm = realloc(m, cap * sizeof(*m));
			if (!nm)
				FAIL("out of memory");
			m = nm;
		}
		m[cnt++] = (struct bench_mapping){ .base = base, .size = size, .offset = offset,
						   .page_size = ps };
		p = skip_ws(p, e);
		if (p < e && *p == ',') {
			p++;
			continue;
		}
		if (p < e && *p == ']') {
			p++;
			break;
		}
		FAIL("expected ',' or ']' at byte %zu", (size_t)(p - json));
	}
	if (alloc_bitmaps(m, cnt)) {
		free_mappings(m, cnt);
		m = NULL;
		cnt = 0;
		FAIL("out of memory");
	}
	*out = m;
	*n = cnt;
	return 0;
fail:
	free(m);
	return -1;
}

/* ---------------------------------------------------------------- serving */

struct ctx {
	int uffd;
	struct bench_mapping *m;
	size_t n, last;
	const struct serve_opts *o;
	struct serve_stats *st;
	uint8_t *scratch;
	size_t scratch_len;
	struct deferred { uint64_t addr, since; } *deferred;
	size_t ndef, capdef;
};

static inline int bit_test(const uint64_t *b, uint64_t i) { return (b[i >> 6] >> (i & 63)) & 1; }
static inline void bit_set(uint64_t *b, uint64_t i) { b[i >> 6] |= 1ULL << (i & 63); }
static inline void bit_clear(uint64_t *b, uint64_t i) { b[i >> 6] &= ~(1ULL << (i & 63)); }

static void mark(struct bench_mapping *m, uint64_t first, uint64_t count)
{
	for (uint64_t i = first; i < first + count; i++)
		bit_set(m->served, i);
}

static struct bench_mapping *find_map(struct ctx *c, uint64_t addr)
{
	struct bench_mapping *m = &c->m[c->last];

	if (addr - m->base < m->size)
		return m;
	for (size_t i = 0; i < c->n; i++)
		if (addr - c->m[i].base < c->m[i].size) {
			c->last = i;
			return &c->m[i];
		}
	return NULL;
}

/* UFFDIO_COPY pages [first, first+count) of m.  Returns 0 when every page is
 * present (copied by us or EEXIST), -EAGAIN when the mm is changing (the rest
 * must be retried after reading events), other -errno on failure.  Sets
 * *fault_eexist when page `fault_pg` turned out to be present already. */
static int copy_run(struct ctx *c, struct bench_mapping *m, uint64_t first, uint64_t count,
		    uint64_t fault_pg, int *fault_eexist)
{
	uint64_t ps = m->page_size;

	while (count) {
		uint64_t off = m->offset + first * ps, len = count * ps;
		struct uffdio_copy cp = { .dst = m->base + first * ps, .len = len, .mode = 0 };
		int err;

		if (c->o->snap && off + len <= c->o->snap_len) {
			cp.src = (uint64_t)(uintptr_t)(c->o->snap + off);
		} else {
			pattern_fill(c->scratch, off, len);
			cp.src = (uint64_t)(uintptr_t)c->scratch;
		}
		c->st->copies++;
		if (ioctl(c->uffd, UFFDIO_COPY, &cp) == 0) {
			mark(m, first, count);
			c->st->pages_copied += count;
			return 0;
		}
		err = errno;
		if (cp.copy > 0) { /* partial progress: the ioctl reports -EAGAIN */
			uint64_t done = (uint64_t)cp.copy / ps;

			mark(m, first, done);
			c->st->pages_copied += done;
			c->st->partial_copies++;
			first += done;
			count -= done;
			continue;
		}
		if (err == EEXIST) {
			c->st->eexist++;
			if (first == fault_pg)
				*fault_eexist = 1;
			mark(m, first, 1);
			first++;
			count--;
			continue;
		}
		if (err == EAGAIN)
			return -EAGAIN;
		c->st->copy_errors++;
		return -err;
	}
	return 0;
}

/* Resolve one fault at addr.  0 done, -EAGAIN to defer, other -errno. */
static int resolve_fault(struct ctx *c, uint64_t addr)
{
	struct bench_mapping *m = find_map(c, addr);
	uint64_t pg, end, i, j;
	int fault_eexist = 0, r;

	if (!m) {
		if (!c->st->unknown_addr++)
			fprintf(stderr, "ref_handler: fault at 0x%" PRIx64 " outside every mapping\n",
				addr);
		return -EFAULT;
	}
	pg = (addr - m->base) / m->page_size;
	if (bit_test(m->served, pg)) {
		/* Several threads faulted the page before it was copied (each
		 * queues a message), or it was zapped without a REMOVE event.
		 * Copy just this page: EEXIST is the usual answer. */
		c->st->dup_faults++;
		r = copy_run(c, m, pg, 1, pg, &fault_eexist);
	} else {
		end = pg + c->o->readahead;
		if (end > m->npages)
			end = m->npages;
		r = 0;
		for (i = pg; i < end; i = j) {
			if (bit_test(m->served, i)) {
				j = i + 1;
				continue;
			}
			for (j = i + 1; j < end && !bit_test(m->served, j); j++)
				;
			r = copy_run(c, m, i, j - i, pg, &fault_eexist);
			if (r == -EAGAIN && bit_test(m->served, pg))
				r = 0; /* faulting page is in: drop the rest of the window */
			if (r)
				break;
		}
	}
	if (!r && fault_eexist) {
		/* Present already: the faulter re-checks the pte before sleeping,
		 * but a WAKE is cheap insurance against a lost wake-up. */
		struct uffdio_range wr = { .start = m->base + pg * m->page_size,
					   .len = m->page_size };

		c->st->wakes++;
		if (ioctl(c->uffd, UFFDIO_WAKE, &wr) < 0)
			return -errno;
	}
	return r;
}

static int defer(struct ctx *c, uint64_t addr)
{
	if (c->ndef == c->capdef) {
		size_t cap = c->capdef ? c->capdef * 2 : 64;
		struct deferred *d = realloc(c->deferred, cap * sizeof(*d));

		if (!d)
			return -ENOMEM;
		c->deferred = d;
		c->capdef = cap;
	}
	c->deferred[c->ndef].addr = addr;
	c->deferred[c->ndef++].since = now_ns();
	if (c->ndef > c->st->max_deferred)
		c->st->max_deferred = c->ndef;
	return 0;
}

static int retry_deferred(struct ctx *c)
{
	size_t keep = 0;

	for (size_t i = 0; i < c->ndef; i++) {
		int r = resolve_fault(c, c->deferred[i].addr);
		uint64_t dt;

		if (r == -EAGAIN) {
			c->st->eagain_retries++;
			c->deferred[keep++] = c->deferred[i];
			continue;
		}
		if (r && r != -EFAULT)
			return r;
		dt = now_ns() - c->deferred[i].since;
		c->st->deferred_ns_sum += dt;
		if (dt > c->st->deferred_ns_max)
			c->st->deferred_ns_max = dt;
	}
	c->ndef = keep;
	return 0;
}

static void on_remove(struct ctx *c, uint64_t start, uint64_t end)
{
	c->st->removes++;
	for (size_t k = 0; k < c->n; k++) {
		struct bench_mapping *m = &c->m[k];
		uint64_t s = start > m->base ? start : m->base;
		uint64_t e = end < m->base + m->size ? end : m->base + m->size;

		if (s >= e)
			continue;
		for (uint64_t i = (s - m->base) / m->page_size;
		     i < (e - m->base + m->page_size - 1) / m->page_size; i++) {
			c->st->removed_pages += bit_test(m->served, i);
			bit_clear(m->served, i);
		}
	}
}

static int handle_msgs(struct ctx *c, const struct uffd_msg *msgs, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		const struct uffd_msg *msg = &msgs[i];
		int r;

		switch (msg->event) {
		case UFFD_EVENT_PAGEFAULT:
			c->st->faults++;
			if (msg->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE)
				c->st->write_faults++;
			if (msg->arg.pagefault.feat.ptid)
				c->st->ptid_nonzero++;
			r = resolve_fault(c, msg->arg.pagefault.address);
			if (r == -EAGAIN) {
				c->st->eagain++;
				r = defer(c, msg->arg.pagefault.address);
			}
			if (r && r != -EFAULT)
				return r;
			break;
		case UFFD_EVENT_REMOVE:
			on_remove(c, msg->arg.remove.start, msg->arg.remove.end);
			break;
		default:
			c->st->other_events++;
			break;
		}
	}
	return 0;
}

int serve_uffd(int uffd, int peer_fd, struct bench_mapping *m, size_t n,
	       const struct serve_opts *opts, struct serve_stats *st)
{
	struct ctx c = { .uffd = uffd, .m = m, .n = n, .o = opts, .st = st };
	struct uffd_msg msgs[UFFD_MSG_BATCH];
	uint64_t maxps = 4096;
	unsigned spins = 0;
	int ret = 0, closed = 0;

	if (!n)
		return -EINVAL;
	for (size_t i = 0; i < n; i++)
		if (m[i].page_size > maxps)
			maxps = m[i].page_size;
	c.scratch_len = maxps * (opts->readahead ? opts->readahead : 1);
	c.scratch = mmap(NULL, c.scratch_len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (c.scratch == MAP_FAILED)
		return -errno;

	while (!closed) {
		struct pollfd pfd[2] = { { .fd = uffd, .events = POLLIN },
					 { .fd = peer_fd, .events = POLLIN } };
		int timeout = -1, r;

		if (c.ndef) {
			/* EAGAIN pending: the remover must run to drop mmap_changing.
			 * Yield, spin briefly, then back off to 1 ms polls. */
			timeout = spins++ < 1000 ? 0 : 1;
			sched_yield();
		} else
			spins = 0;
		st->polls++;
		r = poll(pfd, peer_fd >= 0 ? 2 : 1, timeout);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			ret = -errno;
			break;
		}
		if (peer_fd >= 0 && pfd[1].revents) {
			char buf[256];
			ssize_t k;

			if (pfd[1].revents & (POLLHUP | POLLERR | POLLNVAL)) {
				closed = 1;
			} else {
				k = recv(peer_fd, buf, sizeof(buf), MSG_DONTWAIT);
				if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR))
					closed = 1;
			}
		}
		if (pfd[0].revents & POLLIN) {
			ssize_t k = read(uffd, msgs, sizeof(msgs));

			st->reads++;
			if (k == 0) { /* never happens on a uffd */
				ret = -EIO;
				break;
			}
			if (k < 0) {
				if (errno != EAGAIN && errno != EINTR) {
					ret = -errno;
					break;
				}
				st->empty_reads++;
			} else {
				size_t cnt = (size_t)k / sizeof(msgs[0]);

				st->msgs += cnt;
				ret = handle_msgs(&c, msgs, cnt);
				if (ret)
					break;
			}
		} else if (pfd[0].revents & (POLLERR | POLLNVAL)) {
			ret = -EIO;
			break;
		}
		if (c.ndef) {
			ret = retry_deferred(&c);
			if (ret)
				break;
		}
	}
	free(c.deferred);
	munmap(c.scratch, c.scratch_len);
	return ret;
}

void print_serve_stats(FILE *f, const struct serve_stats *s)
{
	fprintf(f,
		"\"polls\":%" PRIu64 ",\"reads\":%" PRIu64 ",\"empty_reads\":%" PRIu64
		",\"msgs\":%" PRIu64 ",\"faults\":%" PRIu64 ",\"write_faults\":%" PRIu64
		",\"ptid_nonzero\":%" PRIu64 ",\"copies\":%" PRIu64 ",\"pages_copied\":%" PRIu64
		",\"partial_copies\":%" PRIu64 ",\"eexist\":%" PRIu64 ",\"wakes\":%" PRIu64
		",\"dup_faults\":%" PRIu64 ",\"unknown_addr\":%" PRIu64 ",\"copy_errors\":%" PRIu64
		",\"eagain\":%" PRIu64 ",\"eagain_retries\":%" PRIu64 ",\"max_deferred\":%" PRIu64
		",\"deferred_us_max\":%.1f,\"deferred_us_mean\":%.1f"
		",\"removes\":%" PRIu64 ",\"removed_pages\":%" PRIu64 ",\"other_events\":%" PRIu64,
		s->polls, s->reads, s->empty_reads, s->msgs, s->faults, s->write_faults,
		s->ptid_nonzero, s->copies, s->pages_copied, s->partial_copies, s->eexist,
		s->wakes, s->dup_faults, s->unknown_addr, s->copy_errors, s->eagain,
		s->eagain_retries, s->max_deferred, (double)s->deferred_ns_max / 1e3,
		s->eagain ? (double)s->deferred_ns_sum / 1e3 / (double)s->eagain : 0.0, s->removes, s->removed_pages,
		s->other_events);
}
