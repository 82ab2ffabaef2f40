/* Small helpers shared by the C benchmark programs. */
#ifndef UFFD_BENCH_COMMON_H
#define UFFD_BENCH_COMMON_H

#include <stdint.h>
#include <stddef.h>
#include <time.h>

static inline uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

/* How the uffd was created (for the report). */
enum uffd_origin { UFFD_VIA_DEV = 1, UFFD_VIA_SYSCALL = 2 };

/* Create a non-blocking, close-on-exec uffd: /dev/userfaultfd +
 * USERFAULTFD_IOC_NEW, falling back to the userfaultfd(2) syscall, then
 * negotiate UFFDIO_API with `features`.  Returns the fd or -errno; on success
 * *got_features holds the features the kernel reported and *origin how it
 * was made. */
int uffd_create(uint64_t features, uint64_t *got_features, enum uffd_origin *origin);

/* Register [addr, addr+len) in MISSING mode.  0 or -errno. */
int uffd_register_missing(int uffd, void *addr, size_t len);

/* Parse an unsigned integer option value; exits with a message on error. */
uint64_t parse_u64(const char *opt, const char *s);

/* Pin the calling thread to one CPU (cpu < 0: no-op).  0 or -errno. */
int pin_thread(int cpu);

/* The calling thread's allowed CPUs as a list like "0-1" or "0,2". */
void affinity_str(char *buf, size_t len);

/* Escape-free JSON string check: true if s needs no escaping. */
int json_plain(const char *s);

#endif
