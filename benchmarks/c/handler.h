/* The reference fault-handling loop, done as Firecracker's example handler
 * does it: one thread, poll() on the uffd, read() a batch of uffd_msg,
 * UFFDIO_COPY per fault (with an optional read-ahead window), EAGAIN faults
 * deferred until pending events are read, REMOVE clears the served bitmap. */
#ifndef UFFD_BENCH_HANDLER_H
#define UFFD_BENCH_HANDLER_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct bench_mapping {
	uint64_t base;      /* base_host_virt_addr */
	uint64_t size;
	uint64_t offset;    /* offset in the (virtual) memory file */
	uint64_t page_size;
	uint64_t npages;
	uint64_t *served;   /* bitmap, one bit per page: already copied in */
};

/* Parse the Firecracker mapping array.  Returns 0, or -1 with a message in
 * err.  *out is malloc()ed (bitmaps too); free with free_mappings(). */
int parse_mappings(const char *json, size_t len, struct bench_mapping **out, size_t *n,
		   char *err, size_t errlen);
/* Allocate the bitmaps (parse_mappings does it; for hand-built mappings). */
int alloc_bitmaps(struct bench_mapping *m, size_t n);
void free_mappings(struct bench_mapping *m, size_t n);

struct serve_opts {
	unsigned readahead;      /* pages copied per fault, >= 1 */
	const uint8_t *snap;     /* optional pre-populated "snapshot file" */
	uint64_t snap_len;       /* content for offsets beyond it is generated */
};

struct serve_stats {
	uint64_t polls, reads, empty_reads, msgs;
	uint64_t faults, write_faults, ptid_nonzero;
	uint64_t copies, pages_copied, partial_copies;
	uint64_t eexist, wakes, dup_faults, unknown_addr, copy_errors;
	uint64_t eagain, eagain_retries, max_deferred;
	uint64_t deferred_ns_max, deferred_ns_sum;  /* first EAGAIN -> resolved */
	uint64_t removes, removed_pages, other_events;
};

/* Serve `uffd` until `peer_fd` reports hang-up / EOF (or error).
 * Returns 0 on peer close, -errno on a fatal error. */
int serve_uffd(int uffd, int peer_fd, struct bench_mapping *m, size_t n,
	       const struct serve_opts *opts, struct serve_stats *st);

void print_serve_stats(FILE *f, const struct serve_stats *st);

#endif
