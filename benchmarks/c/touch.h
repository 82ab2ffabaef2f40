/* Faulting side shared by `workload` (handoff) and `inproc`: memory layout,
 * the touching threads with per-fault timing, verification, JSON output. */
#ifndef UFFD_BENCH_TOUCH_H
#define UFFD_BENCH_TOUCH_H

#include <stddef.h>
#include <stdint.h>

struct layout_region {
	uint8_t *base;
	size_t pages;
	size_t first;  /* index of its first page; file offset = first * page_size */
};

struct layout {
	size_t pages, page_size, nreg;
	uint8_t *reserve;
	size_t reserve_len;
	uint8_t **page_addr;          /* page index -> address */
	struct layout_region *reg;
};

/* mmap `nreg` anonymous private regions (one guard page between them), each
 * registered MISSING on uffd (not registered if uffd < 0).  Page i lives at file offset i * page_size. */
int layout_create(struct layout *l, int uffd, size_t pages, size_t page_size, size_t nreg,
		  char *err, size_t errlen);
/* The Firecracker mapping array for the layout.  Returns length or -1. */
int layout_json(const struct layout *l, char *buf, size_t cap);

enum touch_order { ORDER_SEQ, ORDER_RANDOM };
enum touch_share { SHARE_CHUNK, SHARE_INTERLEAVE };

struct touch_cfg {
	const struct layout *l;
	unsigned threads;
	enum touch_order order;
	enum touch_share share;
	int write;
	uint64_t seed;
	int fault_cpu;     /* >= 0: pin every touching thread to this CPU */
	unsigned subset_permille; /* > 0: touch only the pages of a fixed random subset */
	uint64_t set_seed;        /* which subset (the order comes from seed) */
};

/* Page i is in cfg's subset (always, without one).  The subset depends on set_seed
 * only, so runs with other seeds touch the same pages in another order. */
int touch_in_set(const struct touch_cfg *cfg, size_t page);
/* verify_layout over the subset's pages only (all pages without one). */
size_t verify_touched(const struct touch_cfg *cfg);

struct touch_result {
	size_t timed;
	double p50_us, p90_us, p99_us, mean_us, max_us;
	double wall_s, mib_per_s;
	long minflt;
};

/* Touch every page (of the subset) once from cfg->threads threads (first touch timed). */
int run_touch(const struct touch_cfg *cfg, struct touch_result *res);

struct churn_result {
	uint64_t madvises, removed_pages, reads, bad_reads;
	double seconds;
};

/* For `ms` milliseconds: one thread MADV_DONTNEEDs random runs of 1..64 pages
 * (each one a UFFD_EVENT_REMOVE the handler must read before madvise returns,
 * and the window in which UFFDIO_COPY fails with EAGAIN) while cfg->threads
 * threads read random words and compare them with the pattern. */
int run_churn(const struct touch_cfg *cfg, unsigned ms, struct churn_result *res);

/* Check every word of every page.  Returns the number of bad words. */
size_t verify_layout(const struct layout *l);

/* Print the fields common to both programs (no braces). */
void print_touch_json(const struct touch_cfg *cfg, const struct touch_result *r);

#endif
