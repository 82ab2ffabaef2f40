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
 * Phase 2 (ua_engine_attach: the engine on the pager's io_uring ring).
 * Operations are io_uring SQEs on that ring whose user_data is the address
 * of a struct e_op ORed with UA_ENGINE_UD_TAG; the ring's reaper hands their
 * CQEs to ua_engine_cqe in C (ring_engine.h), so they never reach Python.
 *  - Page-cache misses: a fault on a file page not in the page cache starts
 *    an io_uring READ of its window into a buffer of the engine's pool (the
 *    loop never blocks on the disk); faults on pages of a READ in flight join
 *    it (their threads stay asleep).  On completion: one UFFDIO_COPY of what
 *    was read (the window), one-page copies for joiners outside it, and the
 *    faults a failed or short READ (a truncated file) cannot serve are queued
 *    for Python (ua_engine_take), whose error policy applies.
 *  - Ring writes (patched kernel, wfd >= 0): COPY and ZEROPAGE become
 *    io_uring WRITEs at pos = dst | op on the uffd's writer fd, submitted in
 *    the pager's next io_uring_enter (with the re-armed read), or by the
 *    engine before it reads the uffd again.  A short count or EEXIST is
 *    finished with pwrite and the range woken, as resolve_ring.py does;
 *    other errors pass the fault up.
 *
 * Threading: every call comes from the pager's loop thread (the reaper runs
 * there too); nothing here is shared with other threads.  Sources stay valid
 * while their region is in the table: Python keeps the buffer (or mapping)
 * alive until it drops the region, and dropping a region waits for its
 * WRITEs (which read the source); READs only touch engine buffers, so a
 * region (or the whole engine) may go while they are in flight: the
 * operation is orphaned and its buffer freed when its CQE comes back.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <liburing.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ring_engine.h"
#include "engine.h"

/* uffd ABI bits used here (include/uapi/linux/userfaultfd.h) */
#define E_EVENT_PAGEFAULT 0x12
#define E_EVENT_REMAP 0x14
#define E_EVENT_REMOVE 0x15
#define E_EVENT_UNMAP 0x16
#define E_PF_WRITE (1ULL << 0)
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

/* write positions of the patched kernel (kernel_patches/uapi.md, uffd_aio/wpos.py) */
#define E_WPOS_COPY (0u << 1)
#define E_WPOS_ZEROPAGE (1u << 1)
#define E_WPOS_WAKE (5u << 1)

#define E_OP_READ 1
#define E_OP_WRITE 2
#define E_SETTLE_MS 2000

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
	int fd;            /* file regions: where READs of misses go (-1: none) */
	uint64_t file_off; /* file offset of page 0 */
	int record;        /* log its demand faults (ua_engine_record) */
};

struct e_op {
	struct ua_engine *e;
	struct e_op *next_free;
	int kind;             /* E_OP_READ / E_OP_WRITE; 0 = free */
	int slot;             /* READ: pool slot */
	struct e_region *reg; /* NULL: the region was dropped (orphan) */
	uint64_t rel, n;      /* first page (index in reg) and pages */
	uint64_t dst;         /* address of page rel when submitted */
	uint64_t src;         /* WRITE: source (0: zeros); READ: pool buffer */
	uint32_t bits;        /* WRITE: op bits of the position */
	struct e_msg msg;     /* WRITE: the fault (passed up on error) */
	struct e_msg *wait;   /* READ: the faults waiting for it (the first included) */
	int nwait, wcap;
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
	/* phase 2 */
	struct ua_ring *ring; /* NULL: not attached (or the ring is gone) */
	int wfd;              /* writer fd (patched kernel) or -1 */
	int nslots;
	uint64_t slot_bytes;
	uint8_t *pool;        /* nslots * slot_bytes, mmap'ed */
	struct e_op **reads;  /* per slot: the READ using it, or NULL */
	struct e_op **ops;    /* every op allocated (freed with the engine) */
	int nops, opscap;
	struct e_op *free_ops;
	int inflight;         /* ops whose CQE has not come back */
	int orphan_writes;    /* WRITEs of dropped regions still in flight */
	int dying;            /* ua_engine_free ran while ops were in flight */
	int leak_pool;        /* the ring went with ops out: never free the pool */
	struct e_msg *up;     /* messages for Python (ua_engine_take) */
	int nup, upcap;
	struct ua_touch *log; /* first touches (ua_engine_record), UA_ENGINE_LOG_CAP */
	uint32_t nlog;
};

/* ---- table ------------------------------------------------------------ */

struct ua_engine *ua_engine_new(int uffd)
{
	struct ua_engine *e = calloc(1, sizeof(*e));

	if (e) {
		e->uffd = uffd;
		e->wfd = -1;
	}
	return e;
}

static void region_free(struct e_region *r)
{
	if (r) {
		free(r->resident);
		free(r);
	}
}

static void engine_destroy(struct ua_engine *e)
{
	int i;

	for (i = 0; i < e->nregs; i++)
		region_free(e->regs[i]);
	for (i = 0; i < e->nops; i++) {
		free(e->ops[i]->wait);
		free(e->ops[i]);
	}
	if (e->pool && !e->leak_pool)
		munmap(e->pool, (size_t)e->nslots * e->slot_bytes);
	free(e->ops);
	free(e->reads);
	free(e->regs);
	free(e->ent);
	free(e->up);
	free(e->log);
	free(e);
}

static int orphans_pending(void *arg) { return ((struct ua_engine *)arg)->orphan_writes > 0; }
static void orphan_ops(struct ua_engine *e, struct e_region *r);

void ua_engine_free(struct ua_engine *e)
{
	int i;

	if (!e)
		return;
	/* WRITEs read the sources Python releases after this: wait for them */
	for (i = 0; i < e->nregs; i++)
		orphan_ops(e, e->regs[i]);
	if (e->orphan_writes && e->ring)
		ua_ring_eng_settle(e->ring, orphans_pending, e, E_SETTLE_MS);
	e->nup = 0;
	if (e->inflight > 0 && e->ring) {
		/* READs still write into the pool: free when the last CQE comes
		 * back (ua_engine_cqe), or leak if the ring goes first */
		e->dying = 1;
		return;
	}
	if (e->ring)
		ua_ring_eng_unlink(e->ring, e);
	engine_destroy(e);
}

static uint32_t ua_engine_cqe(uint64_t user_data, int32_t res);
static void ua_engine_ring_gone(struct ua_engine *e);

/* what the ring shim calls back (ring_engine.h) */
static const struct ua_ring_eng_ops e_ring_ops = {
	.cqe = ua_engine_cqe,
	.ring_gone = ua_engine_ring_gone,
};

static void ua_engine_ring_gone(struct ua_engine *e)
{
	e->ring = NULL;
	if (e->inflight > 0)
		e->leak_pool = 1; /* the kernel may still be writing into it */
	if (e->dying) {
		if (e->inflight > 0) /* leaked: freeing it could race the kernel */
			return;
		engine_destroy(e);
	}
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
	r->fd = -1;
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
	orphan_ops(e, r);
	if (e->orphan_writes && e->ring) /* the source must outlive its WRITEs */
		ua_ring_eng_settle(e->ring, orphans_pending, e, E_SETTLE_MS);
	for (i = 0; i < e->nent; i++)
		if (e->ent[i].reg != r)
			e->ent[j++] = e->ent[i];
	e->nent = j;
	for (i = 0, j = 0; i < (int)e->nlog; i++) /* not drained: gone with it */
		if (e->log[i].region != id)
			e->log[j++] = e->log[i];
	e->nlog = (uint32_t)j;
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

/* ---- operations on the ring (phase 2) --------------------------------- */

int ua_engine_attach(struct ua_engine *e, struct ua_ring *r, int wfd, uint32_t read_slots,
		     uint32_t slot_bytes)
{
	int rc;

	if (!r || e->ring || read_slots > 1024 || (read_slots && (!slot_bytes ||
	    slot_bytes % 4096 || slot_bytes > (64u << 20))))
		return -EINVAL;
	if (read_slots) {
		size_t len = (size_t)read_slots * slot_bytes;
		void *pool = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				  -1, 0);

		if (pool == MAP_FAILED)
			return -errno;
		e->reads = calloc(read_slots, sizeof(*e->reads));
		if (!e->reads) {
			munmap(pool, len);
			return -ENOMEM;
		}
		e->pool = pool;
		e->nslots = (int)read_slots;
		e->slot_bytes = slot_bytes;
	}
	rc = ua_ring_eng_link(r, e, &e_ring_ops);
	if (rc < 0)
		return rc;
	e->ring = r;
	e->wfd = wfd;
	return 0;
}

int ua_engine_file(struct ua_engine *e, int id, int fd, uint64_t off)
{
	struct e_region *r = region_by_id(e, id, NULL);

	if (!r)
		return -ENOENT;
	if (r->kind != UA_SRC_FILE || fd < 0 || off & (r->page_size - 1))
		return -EINVAL;
	r->fd = fd;
	r->file_off = off;
	return 0;
}

int ua_engine_inflight(struct ua_engine *e) { return e->inflight; }

int ua_engine_take(struct ua_engine *e, uint64_t buf, uint32_t cap)
{
	int n = (int)(cap / E_MSG_SIZE), left;

	if (!buf)
		return -EINVAL;
	if (n > e->nup)
		n = e->nup;
	memcpy((void *)(uintptr_t)buf, e->up, (size_t)n * E_MSG_SIZE);
	left = e->nup - n;
	memmove(e->up, e->up + n, (size_t)left * E_MSG_SIZE);
	e->nup = left;
	return n;
}

/* queue a message for Python (ua_engine_take) */
static void pass_up(struct ua_engine *e, const struct e_msg *m)
{
	if (e->nup == e->upcap) {
		int cap = e->upcap ? 2 * e->upcap : 64;
		struct e_msg *n = realloc(e->up, (size_t)cap * sizeof(*n));

		if (!n) /* the thread stays asleep until a duplicate fault: rare, and logged as lost */
			return;
		e->up = n;
		e->upcap = cap;
	}
	e->up[e->nup++] = *m;
	e->st.passed_up++;
}

static struct e_op *op_get(struct ua_engine *e, int kind)
{
	struct e_op *op = e->free_ops;

	if (op) {
		e->free_ops = op->next_free;
	} else {
		if (e->nops == e->opscap) {
			int cap = e->opscap ? 2 * e->opscap : 16;
			struct e_op **n = realloc(e->ops, (size_t)cap * sizeof(*n));

			if (!n)
				return NULL;
			e->ops = n;
			e->opscap = cap;
		}
		op = calloc(1, sizeof(*op));
		if (!op)
			return NULL;
		op->e = e;
		e->ops[e->nops++] = op;
	}
	op->kind = kind;
	op->nwait = 0;
	op->slot = -1;
	return op;
}

static void op_put(struct ua_engine *e, struct e_op *op)
{
	if (op->kind == E_OP_READ && op->slot >= 0)
		e->reads[op->slot] = NULL;
	op->kind = 0;
	op->reg = NULL;
	op->next_free = e->free_ops;
	e->free_ops = op;
}

static int op_submit(struct ua_engine *e, struct e_op *op, int opcode, int fd, uint64_t addr,
		     uint32_t len, uint64_t off)
{
	if (ua_ring_eng_prep(e->ring, opcode, fd, addr, len, off, (uint64_t)(uintptr_t)op) < 0)
		return -EBUSY;
	e->inflight++;
	return 0;
}

/* the region goes: its ops must not touch it (nor, for WRITEs, be forgotten
 * before they completed: their source is about to be released) */
static void orphan_ops(struct ua_engine *e, struct e_region *r)
{
	int i;

	for (i = 0; i < e->nops; i++) {
		struct e_op *op = e->ops[i];

		if (!op->kind || op->reg != r)
			continue;
		op->reg = NULL;
		if (op->kind == E_OP_WRITE)
			e->orphan_writes++;
	}
}

/* where page rel of r is now (REMAP may have moved it), and how many pages
 * from there stay in the same range (at most n); 0 when it is gone */
static uint64_t where(struct ua_engine *e, struct e_region *r, uint64_t rel, uint64_t n,
		      uint64_t *addr)
{
	int i;

	for (i = 0; i < e->nent; i++) {
		struct e_entry *x = &e->ent[i];
		uint64_t pages = (x->end - x->start) >> r->shift;

		if (x->reg != r || rel < x->rel || rel >= x->rel + pages)
			continue;
		*addr = x->start + ((rel - x->rel) << r->shift);
		pages -= rel - x->rel;
		return pages < n ? pages : n;
	}
	return 0;
}

/* ---- first-touch log ---------------------------------------------------- */

int ua_engine_record(struct ua_engine *e, int id, int on)
{
	struct e_region *r = region_by_id(e, id, NULL);

	if (!r)
		return -ENOENT;
	if (on && !e->log) {
		e->log = malloc(UA_ENGINE_LOG_CAP * sizeof(*e->log));
		if (!e->log)
			return -ENOMEM;
	}
	r->record = !!on;
	return 0;
}

int ua_engine_touches(struct ua_engine *e, struct ua_touch *out, uint32_t max)
{
	uint32_t n = e->nlog < max ? e->nlog : max;

	if (!n)
		return 0;
	memcpy(out, e->log, n * sizeof(*out));
	memmove(e->log, e->log + n, (e->nlog - n) * sizeof(*out));
	e->nlog -= n;
	return (int)n;
}

/* a recording region's log is full: its faults go up (Python records them) */
static int log_full(const struct ua_engine *e, const struct e_region *r)
{
	return r->record && e->nlog >= UA_ENGINE_LOG_CAP;
}

/* log the demand fault m at page rel of r, which placed (or a READ brings) pages */
static void touch(struct ua_engine *e, const struct e_region *r, uint64_t rel, uint64_t pages,
		  const struct e_msg *m)
{
	struct ua_touch *t;

	if (!r->record || e->nlog >= UA_ENGINE_LOG_CAP) /* (full: checked before serving) */
		return;
	t = &e->log[e->nlog++];
	t->rel = rel;
	t->region = r->id;
	t->pages = (uint16_t)(pages < 0xffff ? pages : 0xffff);
	t->write = (m->a & E_PF_WRITE) ? 1 : 0;
	e->st.touches++;
}

/* ---- serving ------------------------------------------------------------ */

static int e_wake(struct ua_engine *e, uint64_t start, uint64_t len)
{
	struct e_range w = { start, len };

	e->st.ioctls++;
	return ioctl(e->uffd, E_IOC_WAKE, &w) < 0 ? -errno : 0;
}

static int e_copy(struct ua_engine *e, uint64_t dst, uint64_t src, uint64_t len, int64_t *done)
{
	struct e_copy c = { dst, src, len, 0, 0 };
	int rc;

	e->st.ioctls++;
	rc = ioctl(e->uffd, E_IOC_COPY, &c) < 0 ? -errno : 0;
	*done = rc == 0 ? (int64_t)len : c.copy;
	return rc;
}

static void placed(struct ua_engine *e, struct e_region *r, uint64_t rel, uint64_t pages)
{
	set_bits(r, rel, pages);
	if (r->kind == UA_SRC_ZERO)
		e->st.zero_pages += pages;
	else
		e->st.pages_copied += pages;
	if (pages)
		e->st.readahead_pages += pages - 1;
}

/* Resolve with an io_uring WRITE on the writer fd; 0 queued, -1 not possible */
static int place_write(struct ua_engine *e, struct e_region *r, uint64_t page, uint64_t rel,
		       uint64_t n, const struct e_msg *m)
{
	struct e_op *op = op_get(e, E_OP_WRITE);
	uint64_t len = n << r->shift;

	if (!op)
		return -1;
	op->reg = r;
	op->rel = rel;
	op->n = n;
	op->dst = page;
	op->src = r->kind == UA_SRC_ZERO ? 0 : r->src + (rel << r->shift);
	op->bits = r->kind == UA_SRC_ZERO ? E_WPOS_ZEROPAGE : E_WPOS_COPY;
	op->msg = *m;
	if (op_submit(e, op, IORING_OP_WRITE, e->wfd, op->src, (uint32_t)len, page | op->bits) < 0) {
		op_put(e, op);
		return -1;
	}
	/* marked now: a fault on these pages before the WRITE ran gets a
	 * one-page write behind it, which meets EEXIST and wakes */
	set_bits(r, rel, n);
	e->st.ring_writes++;
	return 0;
}

/* Place n pages at page (page index rel of r).  Returns 0 when the
 * faulting page (the first) is in place and its thread woken, 2 when a
 * WRITE doing so is queued, 1 to pass the fault up to Python. */
static int place(struct ua_engine *e, struct e_region *r, uint64_t page, uint64_t rel,
		 uint64_t n, const struct e_msg *m)
{
	uint64_t ps = r->page_size, len = n << r->shift;
	int64_t done;
	int rc;

	if (e->wfd >= 0 && e->ring && len <= (1u << 30) && place_write(e, r, page, rel, n, m) == 0) {
		touch(e, r, rel, n, m);
		return 2; /* counted when its completion comes back */
	}
	if (r->kind == UA_SRC_ZERO) {
		struct e_zeropage z = { { page, len }, 0, 0 };

		e->st.ioctls++;
		rc = ioctl(e->uffd, E_IOC_ZEROPAGE, &z) < 0 ? -errno : 0;
		done = rc == 0 ? (int64_t)len : z.zeropage;
	} else {
		rc = e_copy(e, page, r->src + (rel << r->shift), len, &done);
	}
	if (done > 0) {
		/* all done, or the first pages (-EAGAIN: stopped at a present page,
		 * or the mm changed under a read-ahead: the rest is only read-ahead) */
		uint64_t pages = (uint64_t)done >> r->shift;

		placed(e, r, rel, pages);
		if (!pages)
			return 1;
		touch(e, r, rel, pages, m);
		return 0;
	}
	if (rc == -EEXIST) { /* someone placed it first: the thread may still sleep */
		set_bits(r, rel, 1);
		e->st.wakes++;
		if (e_wake(e, page, ps) < 0)
			return 1;
		touch(e, r, rel, 0, m);
		return 0;
	}
	return 1; /* EAGAIN (mm changing), ENOENT/ESRCH (gone), EFAULT (source): Python */
}

/* the READ in flight whose pages include rel of r */
static struct e_op *read_of(struct ua_engine *e, struct e_region *r, uint64_t rel)
{
	int i;

	for (i = 0; i < e->nslots; i++) {
		struct e_op *op = e->reads[i];

		if (op && op->reg == r && op->rel <= rel && rel < op->rel + op->n)
			return op;
	}
	return NULL;
}

static int add_waiter(struct e_op *op, const struct e_msg *m)
{
	if (op->nwait == op->wcap) {
		int cap = op->wcap ? 2 * op->wcap : 4;
		struct e_msg *n = realloc(op->wait, (size_t)cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		op->wait = n;
		op->wcap = cap;
	}
	op->wait[op->nwait++] = *m;
	return 0;
}

/* Start an io_uring READ of pages [rel, rel+n) of file region r for the
 * fault m; 0 started, 1 not possible (no free buffer...: pass up) */
static int start_read(struct ua_engine *e, struct e_region *r, uint64_t page, uint64_t rel,
		      uint64_t n, const struct e_msg *m)
{
	uint64_t max = e->slot_bytes >> r->shift;
	struct e_op *op;
	int i, slot = -1;

	if (!e->ring || r->fd < 0 || !max)
		return 1;
	for (i = 0; i < e->nslots; i++) {
		struct e_op *o = e->reads[i];

		if (!o) {
			if (slot < 0)
				slot = i;
		} else if (o->reg == r && o->rel > rel && o->rel < rel + n) {
			n = o->rel - rel; /* never read a page twice */
		}
	}
	if (slot < 0)
		return 1;
	if (n > max)
		n = max;
	op = op_get(e, E_OP_READ);
	if (!op)
		return 1;
	op->reg = r;
	op->rel = rel;
	op->n = n;
	op->dst = page;
	op->src = (uint64_t)(uintptr_t)e->pool + (uint64_t)slot * e->slot_bytes;
	if (add_waiter(op, m) < 0 ||
	    op_submit(e, op, IORING_OP_READ, r->fd, op->src, (uint32_t)(n << r->shift),
		      r->file_off + (rel << r->shift)) < 0) {
		op_put(e, op);
		return 1;
	}
	op->slot = slot;
	e->reads[slot] = op;
	e->st.cache_reads++;
	e->st.cache_read_pages += n;
	touch(e, r, rel, n, m);
	return 0;
}

/* 0: served; 1: pass up; 2: taken by a READ (served when it completes) */
static int serve(struct ua_engine *e, struct e_entry *x, const struct e_msg *m)
{
	struct e_region *r = x->reg;
	uint64_t ps = r->page_size, page = m->b & ~(ps - 1);
	uint64_t rel = x->rel + ((page - x->start) >> r->shift);
	uint64_t n = 1, win, room;

	if (rel >= r->npages)
		return 1;
	if (r->kind != UA_SRC_ZERO && (rel + 1) << r->shift > r->src_len)
		return 1; /* no source bytes for this page */
	if (log_full(e, r)) {
		e->st.touch_full++;
		return 1;
	}
	if (r->kind == UA_SRC_FILE && e->nslots) {
		struct e_op *op = read_of(e, r, rel);

		if (op) { /* its page is being read: wait for it, asleep */
			if (add_waiter(op, m) < 0)
				return 1;
			e->st.read_waits++;
			touch(e, r, rel, 0, m);
			return 2;
		}
	}
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
			return e->nslots ? (start_read(e, r, page, rel, n, m) ? 1 : 2) : 1;
		}
		for (i = 1; i < n; i++)
			if (!(vec[i] & 1))
				break;
		n = i;
	}
	return place(e, r, page, rel, n, m);
}

/* 0: resolved here (or taken by an operation); 1: Python must see it */
static int handle(struct ua_engine *e, const struct e_msg *m)
{
	struct e_entry *x;
	int rc;

	switch (m->event) {
	case E_EVENT_PAGEFAULT:
		if (m->a & (E_PF_WP | E_PF_MINOR))
			return 1;
		x = lookup(e, m->b);
		if (!x)
			return 1;
		rc = serve(e, x, m);
		if (rc == 1)
			return 1;
		if (rc == 0)
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

/* ---- completions -------------------------------------------------------- */

static void read_done(struct ua_engine *e, struct e_op *op, int32_t res)
{
	struct e_region *r = op->reg;
	uint64_t got = 0, done = 0, dst = 0, span, base_rel = op->rel;
	int i;

	if (!r) { /* the region was dropped while it read */
		for (i = 0; i < op->nwait; i++) {
			const struct e_msg *m = &op->wait[i];
			struct e_entry *x = lookup(e, m->b);
			int rc;

			/* not native any more: unregistered (the kernel woke its
			 * threads) or unmapped; else the new source serves it */
			if (!x)
				continue;
			rc = serve(e, x, m);
			if (rc == 1)
				pass_up(e, m);
			else if (rc == 0)
				e->st.native_faults++;
		}
		return;
	}
	if (res > 0)
		got = (uint64_t)res >> r->shift; /* whole pages read (short: end of file) */
	if (got > op->n)
		got = op->n;
	span = got ? where(e, r, op->rel, got, &dst) : 0;
	if (span) {
		int64_t d;
		int rc = e_copy(e, dst, op->src, span << r->shift, &d);

		if (d > 0) {
			done = (uint64_t)d >> r->shift;
			placed(e, r, op->rel, done);
		} else if (rc == -EEXIST) {
			set_bits(r, op->rel, 1);
		}
	}
	for (i = 0; i < op->nwait; i++) {
		const struct e_msg *m = &op->wait[i];
		uint64_t rel = base_rel + (((m->b & ~(r->page_size - 1)) - op->dst) >> r->shift);
		uint64_t k = rel - base_rel, at = 0;
		int64_t d;
		int rc;

		if (k < done) { /* woken by the COPY */
			e->st.native_faults++;
			continue;
		}
		if (k >= got || !where(e, r, rel, 1, &at)) {
			e->st.read_passed_up++;
			pass_up(e, m);
			continue;
		}
		/* a joiner past what the window COPY placed (stopped at a present page) */
		rc = e_copy(e, at, op->src + (k << r->shift), r->page_size, &d);
		if (d > 0) {
			placed(e, r, rel, 1);
		} else if (rc == -EEXIST) {
			set_bits(r, rel, 1);
			e->st.wakes++;
			rc = e_wake(e, at, r->page_size);
		}
		if (d > 0 || rc == 0)
			e->st.native_faults++;
		else
			pass_up(e, m);
	}
}

/* the rest of a short or EEXIST ring write, with pwrite (as resolve_ring.py's
 * PwriteBackend.run): skip present pages, then wake the range once */
static void write_done(struct ua_engine *e, struct e_op *op, int32_t res)
{
	struct e_region *r = op->reg;
	uint64_t ps, len, done, written = 0, pages, wpages;
	int skipped = 0, first_skipped = 0;

	if (!r) {
		e->orphan_writes--;
		return;
	}
	ps = r->page_size;
	len = op->n << r->shift;
	if (res >= 0 && (uint64_t)res == len) {
		placed(e, r, op->rel, op->n);
		e->st.native_faults++;
		return;
	}
	if (res > 0) {
		done = written = (uint64_t)res;
	} else if (res == -EEXIST) {
		done = ps;
		skipped = first_skipped = 1;
	} else {
		done = 0;
		goto fail;
	}
	while (done < len) {
		ssize_t got = pwrite(e->wfd, (void *)(uintptr_t)(op->src ? op->src + done : 0),
				     len - done, (off_t)((op->dst + done) | op->bits));

		e->st.pwrites++;
		if (got > 0) {
			done += (uint64_t)got;
			written += (uint64_t)got;
		} else if (got < 0 && errno == EEXIST) {
			done += ps;
			skipped = 1;
		} else {
			break;
		}
	}
	if (skipped) {
		e->st.pwrites++;
		e->st.wakes++;
		if (pwrite(e->wfd, NULL, len, (off_t)(op->dst | E_WPOS_WAKE)) < 0 &&
		    errno != ENOENT && errno != ESRCH && done >= len)
			done = 0; /* could not wake: let Python try */
	}
	if (done >= ps) {
		pages = (done < len ? done : len) >> r->shift;
		wpages = written >> r->shift;
		set_bits(r, op->rel, pages);
		if (pages < op->n)
			clear_bits(r, op->rel + pages, op->n - pages);
		if (r->kind == UA_SRC_ZERO)
			e->st.zero_pages += wpages;
		else
			e->st.pages_copied += wpages;
		e->st.readahead_pages += wpages - (wpages && !first_skipped ? 1 : 0);
		e->st.native_faults++;
		return;
	}
fail:	/* EAGAIN (mm changing), ENOENT/ESRCH, EFAULT...: Python decides */
	clear_bits(r, op->rel, op->n);
	pass_up(e, &op->msg);
}

static uint32_t ua_engine_cqe(uint64_t user_data, int32_t res)
{
	struct e_op *op = (struct e_op *)(uintptr_t)(user_data & ~UA_ENGINE_UD_TAG);
	struct ua_engine *e = op->e;

	e->inflight--;
	if (e->dying) { /* ua_engine_free ran: nothing to serve any more */
		op_put(e, op);
		if (!e->inflight) {
			if (e->ring)
				ua_ring_eng_unlink(e->ring, e);
			engine_destroy(e);
		}
		return 0;
	}
	if (op->kind == E_OP_READ)
		read_done(e, op, res);
	else
		write_done(e, op, res);
	op_put(e, op);
	return e->nup ? UA_ENG_FLAG_PYTHON : 0;
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
		/* READs / WRITEs prepared so far stay in the SQ while the uffd has
		 * messages (those are other threads' faults: ours cannot fault
		 * again before their WRITE ran); they leave with the pager's next
		 * io_uring_enter, together with the re-armed read of the uffd, or
		 * here before spinning on an empty uffd */
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
			if (e->ring && ua_ring_sq_ready(e->ring)) {
				ua_ring_eng_submit(e->ring);
				e->st.submits++;
			}
			sched_yield();
		}
	}
}

void ua_engine_get_stats(struct ua_engine *e, struct ua_engine_stats *out) { *out = e->st; }
