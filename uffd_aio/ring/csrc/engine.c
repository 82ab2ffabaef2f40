/* Native fault engine: the hot path of the common sources in C.
 *
 * The pager's read completion hands the engine the buffer of uffd_msg it
 * just read (the GIL is released: cffi drops it around the call).  For each
 * MISSING fault on a native region the engine picks the read-ahead window,
 * clips it to the range and to pages not yet resident, and resolves it with
 * UFFDIO_COPY (memory, file) or UFFDIO_ZEROPAGE (zero).  Everything else --
 * faults elsewhere or of another kind (WP, MINOR), non-fault events, errors
 * (EAGAIN while the mm changes, ENOENT/ESRCH, EFAULT from a truncated file),
 * file pages not in the page cache -- stays in the buffer, compacted in
 * order, for Python, which applies its handlers and policies.  Policy stays
 * in Python; this file only moves pages.
 *
 * Table: ranges [start, end) sorted by start, each pointing at a region
 * (source, page size, read-ahead state, resident bitmap) at page offset rel.
 * UNMAP cuts ranges, REMAP moves them (their pages move with them, so the
 * resident bits stay valid), REMOVE clears resident bits.  A resident bit
 * only saves work: a fault on a page marked resident is answered with a
 * one-page COPY, and EEXIST then wakes the thread, so a page dropped without
 * a REMOVE event (feature not negotiated) is still served.
 *
 * Threading: every call comes from the pager's loop thread; nothing here is
 * shared with other threads.  Sources stay valid while their region is in
 * the table: Python keeps the buffer (or mapping) alive until it drops the
 * region.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"

/* uffd ABI bits used here (include/uapi/linux/userfaultfd.h) */
#define E_EVENT_PAGEFAULT 0x12
#define E_EVENT_REMAP 0x14
#define E_EVENT_REMOVE 0x15
#define E_EVENT_UNMAP 0x16
#define E_PF_WP (1ULL << 1)
#define E_PF_MINOR (1ULL << 2)
#define E_MSG_SIZE 32

struct e_msg {
	uint8_t event;
	uint8_t reserved1;
	uint16_t reserved2;
	uint32_t reserved3;
	uint64_t a, b, c; /* pagefault: flags, address, ptid; remap: from, to, len;
			     remove/unmap: start, end */
};
_Static_assert(sizeof(struct e_msg) == E_MSG_SIZE, "uffd_msg is 32 bytes");

struct e_range { uint64_t start, len; };
struct e_copy { uint64_t dst, src, len, mode; int64_t copy; };
struct e_zeropage { struct e_range range; uint64_t mode; int64_t zeropage; };
#define E_IOC_WAKE _IOR(0xAA, 0x02, struct e_range)
#define E_IOC_COPY _IOWR(0xAA, 0x03, struct e_copy)
#define E_IOC_ZEROPAGE _IOWR(0xAA, 0x04, struct e_zeropage)

#define E_STREAMS 8 /* adaptive read-ahead streams per region */

struct e_stream {
	uint64_t next; /* page index right after the stream's last window */
	uint32_t size; /* its window; 0 = unused slot */
	uint64_t used; /* LRU stamp */
};

struct e_region {
	int id;
	int kind;
	uint64_t page_size, shift, npages;
	uint64_t src, src_len;
	uint32_t ra_min, ra_max;
	uint64_t stamp;
	struct e_stream streams[E_STREAMS];
	uint8_t *resident; /* one bit per page */
};

struct e_entry {
	uint64_t start, end;
	uint64_t rel; /* page index in the region of start */
	struct e_region *reg;
};

struct ua_engine {
	int uffd;
	int next_id;
	struct e_entry *ent;
	int nent, cap;
	struct e_region **regs;
	int nregs, regcap;
	struct ua_engine_stats st;
};

/* ---- table ------------------------------------------------------------ */

struct ua_engine *ua_engine_new(int uffd)
{
	struct ua_engine *e = calloc(1, sizeof(*e));

	if (e)
		e->uffd = uffd;
	return e;
}

static void region_free(struct e_region *r)
{
	if (r) {
		free(r->resident);
		free(r);
	}
}

void ua_engine_free(struct ua_engine *e)
{
	int i;

	if (!e)
		return;
	for (i = 0; i < e->nregs; i++)
		region_free(e->regs[i]);
	free(e->regs);
	free(e->ent);
	free(e);
}

static int reserve(struct ua_engine *e, int more)
{
	struct e_entry *n;
	int cap;

	if (e->nent + more <= e->cap)
		return 0;
	cap = e->cap ? e->cap : 8;
	while (cap < e->nent + more)
		cap *= 2;
	n = realloc(e->ent, (size_t)cap * sizeof(*n));
	if (!n)
		return -ENOMEM;
	e->ent = n;
	e->cap = cap;
	return 0;
}

/* insert keeping the order by start (ranges never overlap); space reserved */
static void insert_entry(struct ua_engine *e, struct e_entry x)
{
	int i = e->nent;

	while (i > 0 && e->ent[i - 1].start > x.start) {
		e->ent[i] = e->ent[i - 1];
		i--;
	}
	e->ent[i] = x;
	e->nent++;
}

static struct e_entry *lookup(struct ua_engine *e, uint64_t addr)
{
	int lo = 0, hi = e->nent - 1;

	while (lo <= hi) {
		int mid = lo + (hi - lo) / 2;
		struct e_entry *x = &e->ent[mid];

		if (addr < x->start)
			hi = mid - 1;
		else if (addr >= x->end)
			lo = mid + 1;
		else
			return x;
	}
	return NULL;
}

static int is_pow2(uint64_t x) { return x && !(x & (x - 1)); }

int ua_engine_add(struct ua_engine *e, uint64_t start, uint64_t len, uint64_t page_size,
		  int kind, uint64_t src, uint64_t src_len, uint32_t ra_min, uint32_t ra_max)
{
	struct e_region *r, **regs;
	struct e_entry x;
	int i;

	if (!is_pow2(page_size) || !len || (start | len) & (page_size - 1) ||
	    start + len < start || ra_min < 1 || ra_min > ra_max ||
	    ra_max > UA_ENGINE_MAX_WINDOW ||
	    (kind != UA_SRC_MEMORY && kind != UA_SRC_ZERO && kind != UA_SRC_FILE) ||
	    (kind != UA_SRC_ZERO && src_len < len) ||
	    (kind == UA_SRC_FILE && src & (page_size - 1)))
		return -EINVAL;
	/* base pages only: hugetlbfs has no UFFDIO_ZEROPAGE and the mincore()
	 * vector in serve() holds one byte per window page, not per 4 KiB */
	if (page_size != (uint64_t)sysconf(_SC_PAGESIZE))
		return -EOPNOTSUPP;
	for (i = 0; i < e->nent; i++)
		if (e->ent[i].start < start + len && start < e->ent[i].end)
			return -EEXIST;
	if (reserve(e, 1) < 0)
		return -ENOMEM;
	if (e->nregs == e->regcap) {
		int cap = e->regcap ? 2 * e->regcap : 4;

		regs = realloc(e->regs, (size_t)cap * sizeof(*regs));
		if (!regs)
			return -ENOMEM;
		e->regs = regs;
		e->regcap = cap;
	}
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->page_size = page_size;
	r->shift = (uint64_t)__builtin_ctzll(page_size);
	r->npages = len >> r->shift;
	r->resident = calloc((r->npages + 7) / 8, 1);
	if (!r->resident) {
		free(r);
		return -ENOMEM;
	}
	r->id = e->next_id++;
	r->kind = kind;
	r->src = src;
	r->src_len = src_len;
	r->ra_min = ra_min;
	r->ra_max = ra_max;
	e->regs[e->nregs++] = r;
	x.start = start;
	x.end = start + len;
	x.rel = 0;
	x.reg = r;
	insert_entry(e, x);
	return r->id;
}

static struct e_region *region_by_id(struct ua_engine *e, int id, int *index)
{
	int i;

	for (i = 0; i < e->nregs; i++)
		if (e->regs[i]->id == id) {
			if (index)
				*index = i;
			return e->regs[i];
		}
	return NULL;
}

int ua_engine_drop(struct ua_engine *e, int id)
{
	int i, j = 0, index = 0;
	struct e_region *r = region_by_id(e, id, &index);

	if (!r)
		return -ENOENT;
	for (i = 0; i < e->nent; i++)
		if (e->ent[i].reg != r)
			e->ent[j++] = e->ent[i];
	e->nent = j;
	e->regs[index] = e->regs[--e->nregs];
	region_free(r);
	return 0;
}

int ua_engine_nranges(struct ua_engine *e) { return e->nent; }

/* Cut [s, t) out of the table.  With moved != NULL the cut pieces are
 * stored there (at most nent + 0 of them: each range yields at most one),
 * shifted by delta.  Needs room for one more entry (a range split in two). */
static int cut(struct ua_engine *e, uint64_t s, uint64_t t, struct e_entry *moved, int *nmoved,
	       uint64_t delta)
{
	int i, n = e->nent;

	if (t <= s)
		return 0;
	if (reserve(e, 1) < 0)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		struct e_entry x = e->ent[i];
		uint64_t lo, hi;

		if (x.end <= s || x.start >= t)
			continue;
		lo = x.start > s ? x.start : s;
		hi = x.end < t ? x.end : t;
		if (moved) {
			struct e_entry m = { lo + delta, hi + delta,
					     x.rel + ((lo - x.start) >> x.reg->shift), x.reg };
			moved[(*nmoved)++] = m;
		}
		if (x.start < lo && x.end > hi) { /* a hole in the middle: split */
			struct e_entry tail = { hi, x.end, x.rel + ((hi - x.start) >> x.reg->shift),
						x.reg };

			e->ent[i].end = lo;
			insert_entry(e, tail); /* sorts after i: the scan sees it, skips it */
			n = e->nent;
		} else if (x.start < lo) {
			e->ent[i].end = lo;
		} else if (x.end > hi) {
			e->ent[i].start = hi;
			e->ent[i].rel = x.rel + ((hi - x.start) >> x.reg->shift);
		} else {
			e->ent[i].end = e->ent[i].start; /* empty: removed below */
		}
	}
	for (i = 0, n = 0; i < e->nent; i++)
		if (e->ent[i].end > e->ent[i].start)
			e->ent[n++] = e->ent[i];
	e->nent = n;
	return 0;
}

static void set_bits(struct e_region *r, uint64_t rel, uint64_t n)
{
	for (; n; n--, rel++)
		r->resident[rel >> 3] |= (uint8_t)(1u << (rel & 7));
}

static void clear_bits(struct e_region *r, uint64_t rel, uint64_t n)
{
	for (; n; n--, rel++)
		r->resident[rel >> 3] &= (uint8_t)~(1u << (rel & 7));
}

static int bit(const struct e_region *r, uint64_t rel)
{
	return (r->resident[rel >> 3] >> (rel & 7)) & 1;
}

static void on_remove(struct ua_engine *e, uint64_t s, uint64_t t)
{
	int i;

	for (i = 0; i < e->nent; i++) {
		struct e_entry *x = &e->ent[i];
		uint64_t lo, hi, sh;

		if (x->end <= s || x->start >= t)
			continue;
		sh = x->reg->shift;
		/* partial pages at the edges were not dropped whole: round inwards */
		lo = x->start > s ? x->start : s;
		hi = x->end < t ? x->end : t;
		lo = (lo + x->reg->page_size - 1) & ~(x->reg->page_size - 1);
		hi &= ~(x->reg->page_size - 1);
		if (hi > lo)
			clear_bits(x->reg, x->rel + ((lo - x->start) >> sh), (hi - lo) >> sh);
	}
}

static void on_remap(struct ua_engine *e, uint64_t from, uint64_t to, uint64_t len)
{
	struct e_entry *moved;
	int nmoved = 0, i;

	if (!len || !e->nent)
		return;
	moved = malloc((size_t)e->nent * sizeof(*moved));
	if (!moved) /* cannot follow: forget the old place, Python serves the new one */
		goto forget;
	if (cut(e, from, from + len, moved, &nmoved, to - from) < 0)
		goto forget;
	if (reserve(e, nmoved) < 0)
		goto forget;
	for (i = 0; i < nmoved; i++) {
		/* the destination was unmapped first (an UNMAP event, or nothing of
		 * ours was there); stay safe if a stale range still overlaps */
		if (cut(e, moved[i].start, moved[i].end, NULL, NULL, 0) < 0)
			break;
		insert_entry(e, moved[i]);
	}
	free(moved);
	return;
forget:
	free(moved);
	cut(e, from, from + len, NULL, NULL, 0);
}

/* ---- read-ahead -------------------------------------------------------- */

static uint32_t window(struct e_region *r, uint64_t rel)
{
	struct e_stream *s = NULL;
	uint32_t size;
	int i;

	if (r->ra_min == r->ra_max)
		return r->ra_min;
	for (i = 0; i < E_STREAMS; i++) {
		struct e_stream *t = &r->streams[i];

		/* at the stream's next page, or inside its last window (clipped, or
		 * pages dropped since): the same sequential stream */
		if (t->size && (rel == t->next || (t->next - t->size < rel && rel < t->next))) {
			s = t;
			break;
		}
	}
	if (s) {
		size = s->size * 2;
		if (size > r->ra_max)
			size = r->ra_max;
	} else { /* a new stream replaces the least recently used (or an empty) slot */
		s = &r->streams[0];
		for (i = 1; i < E_STREAMS; i++)
			if (r->streams[i].used < s->used)
				s = &r->streams[i];
		size = r->ra_min;
	}
	s->size = size;
	s->next = rel + size;
	s->used = ++r->stamp;
	return size;
}

int ua_engine_window(struct ua_engine *e, int id, uint64_t rel)
{
	struct e_region *r = region_by_id(e, id, NULL);

	if (!r)
		return -ENOENT;
	return (int)window(r, rel);
}

int ua_engine_resident(struct ua_engine *e, int id, uint64_t rel)
{
	struct e_region *r = region_by_id(e, id, NULL);

	if (!r || rel >= r->npages)
		return -ENOENT;
	return bit(r, rel);
}

/* ---- serving ------------------------------------------------------------ */

static int e_wake(struct ua_engine *e, uint64_t start, uint64_t len)
{
	struct e_range w = { start, len };

	e->st.ioctls++;
	return ioctl(e->uffd, E_IOC_WAKE, &w) < 0 ? -errno : 0;
}

/* Place n pages at page (page index rel of r).  Returns 0 when the
 * faulting page (the first) is in place and its thread woken, 1 to pass
 * the fault up to Python. */
static int place(struct ua_engine *e, struct e_region *r, uint64_t page, uint64_t rel,
		 uint64_t n)
{
	uint64_t ps = r->page_size, len = n << r->shift;
	int64_t done;
	int rc;

	e->st.ioctls++;
	if (r->kind == UA_SRC_ZERO) {
		struct e_zeropage z = { { page, len }, 0, 0 };

		rc = ioctl(e->uffd, E_IOC_ZEROPAGE, &z) < 0 ? -errno : 0;
		done = z.zeropage;
	} else {
		struct e_copy c = { page, r->src + (rel << r->shift), len, 0, 0 };

		rc = ioctl(e->uffd, E_IOC_COPY, &c) < 0 ? -errno : 0;
		done = c.copy;
	}
	if (rc == 0)
		done = (int64_t)len;
	if (done > 0) {
		/* all done, or the first pages (-EAGAIN: stopped at a present page,
		 * or the mm changed under a read-ahead: the rest is only read-ahead) */
		uint64_t pages = (uint64_t)done >> r->shift;

		set_bits(r, rel, pages);
		if (r->kind == UA_SRC_ZERO)
			e->st.zero_pages += pages;
		else
			e->st.pages_copied += pages;
		e->st.readahead_pages += pages - 1;
		return pages ? 0 : 1;
	}
	if (rc == -EEXIST) { /* someone placed it first: the thread may still sleep */
		set_bits(r, rel, 1);
		e->st.wakes++;
		return e_wake(e, page, ps) == 0 ? 0 : 1;
	}
	return 1; /* EAGAIN (mm changing), ENOENT/ESRCH (gone), EFAULT (source): Python */
}

static int serve(struct ua_engine *e, struct e_entry *x, uint64_t addr)
{
	struct e_region *r = x->reg;
	uint64_t ps = r->page_size, page = addr & ~(ps - 1);
	uint64_t rel = x->rel + ((page - x->start) >> r->shift);
	uint64_t n = 1, win, room;

	if (rel >= r->npages)
		return 1;
	if (r->kind != UA_SRC_ZERO && (rel + 1) << r->shift > r->src_len)
		return 1; /* no source bytes for this page */
	if (!bit(r, rel)) {
		win = window(r, rel);
		room = (x->end - page) >> r->shift;
		if (win > room)
			win = room;
		if (r->kind != UA_SRC_ZERO && win > (r->src_len >> r->shift) - rel)
			win = (r->src_len >> r->shift) - rel;
		while (n < win && !bit(r, rel + n))
			n++;
	}
	if (r->kind == UA_SRC_FILE) {
		unsigned char vec[UA_ENGINE_MAX_WINDOW];
		uint64_t i;

		/* page-cache check without blocking; pages the kernel cannot tell
		 * about (mincore refuses a file we neither own nor may write, and
		 * then says "resident") would be read synchronously by the COPY */
		if (mincore((void *)(uintptr_t)(r->src + (rel << r->shift)), n << r->shift, vec) < 0 ||
		    !(vec[0] & 1)) {
			e->st.cache_misses++;
			return 1;
		}
		for (i = 1; i < n; i++)
			if (!(vec[i] & 1))
				break;
		n = i;
	}
	return place(e, r, page, rel, n);
}

/* 0: resolved here; 1: Python must see it */
static int handle(struct ua_engine *e, const struct e_msg *m)
{
	struct e_entry *x;

	switch (m->event) {
	case E_EVENT_PAGEFAULT:
		if (m->a & (E_PF_WP | E_PF_MINOR))
			return 1;
		x = lookup(e, m->b);
		if (!x || serve(e, x, m->b))
			return 1;
		e->st.native_faults++;
		return 0;
	case E_EVENT_REMOVE:
		on_remove(e, m->a, m->b);
		return 1;
	case E_EVENT_UNMAP:
		if (cut(e, m->a, m->b, NULL, NULL, 0) < 0) /* ENOMEM: cannot split, drop */
			on_remove(e, m->a, m->b);
		return 1;
	case E_EVENT_REMAP:
		on_remap(e, m->a, m->b, m->c);
		return 1;
	default: /* FORK and anything newer */
		return 1;
	}
}

static int64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int ua_engine_run(struct ua_engine *e, uint64_t buf, uint32_t nbytes, uint32_t cap,
		  int max_reads, int64_t budget_ns)
{
	struct e_msg *msgs = (struct e_msg *)(uintptr_t)buf;
	uint32_t n, i, out;
	int64_t deadline = 0;
	int reads = 0;

	if (!buf || nbytes > cap || nbytes % E_MSG_SIZE || cap < E_MSG_SIZE)
		return -EINVAL;
	if (budget_ns > 0)
		deadline = mono_ns() + budget_ns;
	n = nbytes / E_MSG_SIZE;
	for (;;) {
		for (i = 0, out = 0; i < n; i++) {
			if (!handle(e, &msgs[i]))
				continue;
			if (out != i)
				msgs[out] = msgs[i];
			out++;
		}
		e->st.passed_up += out;
		if (out || reads >= max_reads)
			return (int)out;
		for (;;) {
			ssize_t got = read(e->uffd, msgs, cap - cap % E_MSG_SIZE);

			reads++;
			e->st.reads++;
			if (got > 0) {
				n = (uint32_t)got / E_MSG_SIZE;
				break;
			}
			/* EAGAIN: nothing yet; anything else (closed, EINTR): the
			 * pager's next io_uring read will tell */
			if (got == 0 || errno != EAGAIN || !deadline || reads >= max_reads ||
			    mono_ns() >= deadline)
				return 0;
			sched_yield();
		}
	}
}

void ua_engine_get_stats(struct ua_engine *e, struct ua_engine_stats *out) { *out = e->st; }
