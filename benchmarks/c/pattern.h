/* Deterministic page content shared by the C handlers, the C workloads and
 * (re-implemented) the Python pager.  See benchmarks/README.md.
 *
 * Every 8-byte little-endian word at byte offset `o` of the (virtual) memory
 * file, o % 8 == 0, holds
 *
 *     word(o) = ((o / 8) * 0x9E3779B97F4A7C15  mod 2^64)  XOR  0x5546464441494F21
 *
 * The file offset of a guest address is mapping.offset + (addr - mapping.base).
 */
#ifndef UFFD_BENCH_PATTERN_H
#define UFFD_BENCH_PATTERN_H

#include <stddef.h>
#include <stdint.h>

#define PATTERN_MUL  0x9E3779B97F4A7C15ULL /* 2^64 / golden ratio */
#define PATTERN_SEED 0x5546464441494F21ULL /* "UFFDAIO!" read as a big-endian u64 */

static inline uint64_t pattern_word(uint64_t off)
{
	return ((off >> 3) * PATTERN_MUL) ^ PATTERN_SEED;
}

/* Fill len bytes (multiple of 8) at dst with the content of file offset off
 * (multiple of 8).  Incremental form of pattern_word: add + xor per word. */
static inline void pattern_fill(void *dst, uint64_t off, size_t len)
{
	uint64_t *w = (uint64_t *)dst;
	uint64_t acc = (off >> 3) * PATTERN_MUL;
	size_t n = len >> 3;

	for (size_t i = 0; i < n; i++) {
		w[i] = acc ^ PATTERN_SEED;
		acc += PATTERN_MUL;
	}
}

/* Number of words in [src, src+len) that differ from the pattern at off. */
static inline size_t pattern_mismatches(const void *src, uint64_t off, size_t len)
{
	const uint64_t *w = (const uint64_t *)src;
	uint64_t acc = (off >> 3) * PATTERN_MUL;
	size_t n = len >> 3, bad = 0;

	for (size_t i = 0; i < n; i++) {
		bad += w[i] != (acc ^ PATTERN_SEED);
		acc += PATTERN_MUL;
	}
	return bad;
}

#endif
