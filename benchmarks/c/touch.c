#define _GNU_SOURCE
#include "touch.h"
#include "common.h"
#include "pattern.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif

int layout_create(struct layout *l, int uffd, size_t pages, size_t ps, size_t nreg,
		  char *err, size_t errlen)
{
	uint8_t *p;
	size_t idx = 0;

	memset(l, 0, sizeof(*l));
	if (!pages || !nreg || nreg > pages) {
		snprintf(err, errlen, "need 1 <= regions <= pages");
		return -1;
	}
	l->pages = pages;
	l->page_size = ps;
	l->nreg = nreg;
	/* ps > 4096: hugetlbfs pages (MAP_HUGETLB, from the reserved pool), placed at
	 * huge-page-aligned addresses inside the reservation */
	l->reserve_len = (pages + nreg) * ps + (ps > 4096 ? ps : 0);
	l->reserve = mmap(NULL, l->reserve_len, PROT_NONE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	l->page_addr = calloc(pages, sizeof(*l->page_addr));
	l->reg = calloc(nreg, sizeof(*l->reg));
	if (l->reserve == MAP_FAILED || !l->page_addr || !l->reg) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	p = l->reserve;
	if (ps > 4096)
		p = (uint8_t *)(((uintptr_t)p + ps - 1) & ~(uintptr_t)(ps - 1));
	for (size_t k = 0; k < nreg; k++) {
		struct layout_region *r = &l->reg[k];
		int e;

		r->pages = pages / nreg + (k < pages % nreg);
		r->first = idx;
		r->base = mmap(p, r->pages * ps, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED |
			       (ps > 4096 ? MAP_HUGETLB | (__builtin_ctzll(ps) << MAP_HUGE_SHIFT)
					  : MAP_NORESERVE), -1, 0);
		if (r->base == MAP_FAILED) {
			snprintf(err, errlen, "mmap region %zu: %s", k, strerror(errno));
			return -1;
		}
		e = uffd >= 0 ? uffd_register_missing(uffd, r->base, r->pages * ps) : 0;
		if (e) {
			snprintf(err, errlen, "UFFDIO_REGISTER region %zu: %s", k, strerror(-e));
			return -1;
		}
		for (size_t i = 0; i < r->pages; i++)
			l->page_addr[idx++] = r->base + i * ps;
		p += (r->pages + 1) * ps; /* one PROT_NONE guard page between regions */
	}
	return 0;
}

int layout_json(const struct layout *l, char *buf, size_t cap)
{
	size_t len = 0;
	int k;

	if (cap < 2)
		return -1;
	buf[len++] = '[';
	for (size_t i = 0; i < l->nreg; i++) {
		k = snprintf(buf + len, cap - len,
			     "%s{\"base_host_virt_addr\":%lu,\"size\":%zu,\"offset\":%zu,"
			     "\"page_size\":%zu,\"page_size_kib\":%zu}",
			     i ? "," : "", (unsigned long)(uintptr_t)l->reg[i].base,
			     l->reg[i].pages * l->page_size, l->reg[i].first * l->page_size,
			     l->page_size, l->page_size);
		if (k < 0 || (size_t)k >= cap - len)
			return -1;
		len += (size_t)k;
	}
	if (len + 2 > cap)
		return -1;
	buf[len++] = ']';
	buf[len] = 0;
	return (int)len;
}

struct tctx {
	const struct touch_cfg *cfg;
	pthread_barrier_t *bar;
	size_t *idx;       /* page indices to touch, in order */
	uint64_t *lat;     /* ns per touch */
	size_t n;
	uint64_t start, end, sink;
};

static void *touch_thread(void *arg)
{
	struct tctx *t = arg;
	const struct layout *l = t->cfg->l;
	const size_t ps = l->page_size;
	const int wr = t->cfg->write;
	uint64_t sink = 0;

	if (pin_thread(t->cfg->fault_cpu))
		fprintf(stderr, "warning: cannot pin to CPU %d\n", t->cfg->fault_cpu);
	pthread_barrier_wait(t->bar);
	t->start = now_ns();
	for (size_t k = 0; k < t->n; k++) {
		size_t i = t->idx[k];
		volatile uint64_t *p = (volatile uint64_t *)l->page_addr[i];
		uint64_t a, b;

		a = now_ns();
		if (wr)
			*p = pattern_word((uint64_t)i * ps);
		else
			sink += *p;
		b = now_ns();
		t->lat[k] = b - a;
	}
	t->end = now_ns();
	t->sink = sink;
	return NULL;
}

int touch_in_set(const struct touch_cfg *cfg, size_t page)
{
	uint64_t st;

	if (!cfg->subset_permille)
		return 1;
	st = cfg->set_seed ^ ((uint64_t)page * 0xD6E8FEB86659FD93ULL);
	return splitmix64(&st) % 1000 < cfg->subset_permille;
}

size_t verify_touched(const struct touch_cfg *cfg)
{
	const struct layout *l = cfg->l;
	size_t bad = 0;

	if (!cfg->subset_permille)
		return verify_layout(l);
	for (size_t i = 0; i < l->pages; i++)
		if (touch_in_set(cfg, i))
			bad += pattern_mismatches(l->page_addr[i], (uint64_t)i * l->page_size,
						  l->page_size);
	if (bad)
		fprintf(stderr, "verify: %zu bad words in the subset\n", bad);
	return bad;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static double pct(const uint64_t *v, size_t n, double p)
{
	size_t r = (size_t)(p * (double)n + 0.999999);

	if (r < 1)
		r = 1;
	if (r > n)
		r = n;
	return (double)v[r - 1] / 1e3;
}

int run_touch(const struct touch_cfg *cfg, struct touch_result *res)
{
	const struct layout *l = cfg->l;
	size_t n = l->pages;
	unsigned T = cfg->threads;
	size_t *idx = malloc(n * sizeof(*idx));
	uint64_t *lat = malloc(n * sizeof(*lat));
	struct tctx *tc = calloc(T, sizeof(*tc));
	pthread_t *th = calloc(T, sizeof(*th));
	pthread_barrier_t bar;
	struct rusage ru0, ru1;
	uint64_t start = UINT64_MAX, end = 0, sum = 0;
	size_t pos = 0;
	int ret = 0;

	if (!idx || !lat || !tc || !th)
		return -ENOMEM;
	pthread_barrier_init(&bar, NULL, T);
	for (unsigned t = 0; t < T; t++) {
		struct tctx *c = &tc[t];

		c->cfg = cfg;
		c->bar = &bar;
		c->idx = idx + pos;
		c->lat = lat + pos;
		if (cfg->share == SHARE_CHUNK) {
			size_t a = n * t / T, b = n * (t + 1) / T;

			for (size_t i = a; i < b; i++)
				if (touch_in_set(cfg, i))
					c->idx[c->n++] = i;
		} else {
			for (size_t i = t; i < n; i += T)
				if (touch_in_set(cfg, i))
					c->idx[c->n++] = i;
		}
		if (cfg->order == ORDER_RANDOM) {
			uint64_t st = cfg->seed ^ (0xD1B54A32D192ED03ULL * (t + 1));

			for (size_t i = c->n; i > 1; i--) {
				size_t j = (size_t)(splitmix64(&st) % i);
				size_t tmp = c->idx[i - 1];

				c->idx[i - 1] = c->idx[j];
				c->idx[j] = tmp;
			}
		}
		pos += c->n;
	}
	getrusage(RUSAGE_SELF, &ru0);
	for (unsigned t = 0; t < T; t++)
		if (pthread_create(&th[t], NULL, touch_thread, &tc[t])) {
			fprintf(stderr, "pthread_create failed\n");
			exit(3);
		}
	for (unsigned t = 0; t < T; t++) {
		pthread_join(th[t], NULL);
		if (tc[t].n) {
			start = tc[t].start < start ? tc[t].start : start;
			end = tc[t].end > end ? tc[t].end : end;
		}
	}
	getrusage(RUSAGE_SELF, &ru1);
	pthread_barrier_destroy(&bar);
	n = pos;  /* pages touched (the subset) */
	if (!n) {
		memset(res, 0, sizeof(*res));
		goto out;
	}

	qsort(lat, n, sizeof(*lat), cmp_u64);
	for (size_t i = 0; i < n; i++)
		sum += lat[i];
	res->timed = n;
	res->p50_us = pct(lat, n, 0.50);
	res->p90_us = pct(lat, n, 0.90);
	res->p99_us = pct(lat, n, 0.99);
	res->max_us = (double)lat[n - 1] / 1e3;
	res->mean_us = (double)sum / (double)n / 1e3;
	res->wall_s = (double)(end - start) / 1e9;
	res->mib_per_s = (double)n * (double)l->page_size / (1 << 20) / res->wall_s;
	res->minflt = ru1.ru_minflt - ru0.ru_minflt;
out:
	free(idx);
	free(lat);
	free(tc);
	free(th);
	return ret;
}

size_t verify_layout(const struct layout *l)
{
	size_t bad = 0, badpages = 0;

	for (size_t i = 0; i < l->pages; i++) {
		size_t b = pattern_mismatches(l->page_addr[i], (uint64_t)i * l->page_size,
					      l->page_size);
		if (b && badpages++ < 5)
			fprintf(stderr, "verify: page %zu (%p): %zu bad words, first word %#lx, "
				"expected %#lx\n", i, (void *)l->page_addr[i], b,
				(unsigned long)*(uint64_t *)l->page_addr[i],
				(unsigned long)pattern_word((uint64_t)i * l->page_size));
		bad += b;
	}
	if (badpages)
		fprintf(stderr, "verify: %zu of %zu pages bad, %zu words\n", badpages, l->pages, bad);
	return bad;
}

void print_touch_json(const struct touch_cfg *cfg, const struct touch_result *r)
{
	printf("\"pages\":%zu,\"page_size\":%zu,\"regions\":%zu,\"threads\":%u,"
	       "\"order\":\"%s\",\"share\":\"%s\",\"access\":\"%s\","
	       "\"faults_timed\":%zu,\"p50_us\":%.3f,\"p90_us\":%.3f,\"p99_us\":%.3f,"
	       "\"mean_us\":%.3f,\"max_us\":%.3f,\"wall_s\":%.6f,\"mib_per_s\":%.1f,"
	       "\"minflt\":%ld,\"fault_cpu\":%d",
	       cfg->l->pages, cfg->l->page_size, cfg->l->nreg, cfg->threads,
	       cfg->order == ORDER_SEQ ? "seq" : "random",
	       cfg->share == SHARE_CHUNK ? "chunk" : "interleave", cfg->write ? "write" : "read",
	       r->timed, r->p50_us, r->p90_us, r->p99_us, r->mean_us, r->max_us, r->wall_s,
	       r->mib_per_s, r->minflt, cfg->fault_cpu);
}

struct churn_ctx {
	const struct touch_cfg *cfg;
	volatile int *stop;
	uint64_t seed, ops, pages, bad;
};

static void *churn_reader(void *arg)
{
	struct churn_ctx *c = arg;
	const struct layout *l = c->cfg->l;
	uint64_t st = c->seed, words = l->page_size / 8;

	while (!*c->stop) {
		for (int k = 0; k < 64; k++) {
			uint64_t r = splitmix64(&st);
			size_t i = (size_t)(r % l->pages);
			uint64_t w = (r >> 40) % words;
			uint64_t off = (uint64_t)i * l->page_size + w * 8;
			uint64_t v = ((volatile uint64_t *)l->page_addr[i])[w];

			c->bad += v != pattern_word(off);
			c->ops++;
		}
	}
	return NULL;
}

static void *churn_remover(void *arg)
{
	struct churn_ctx *c = arg;
	const struct layout *l = c->cfg->l;
	uint64_t st = c->seed;

	while (!*c->stop) {
		uint64_t r = splitmix64(&st);
		const struct layout_region *reg = &l->reg[r % l->nreg];
		size_t len = 1 + (size_t)((r >> 16) % 64), first;

		if (len > reg->pages)
			len = reg->pages;
		first = (size_t)((r >> 32) % (reg->pages - len + 1));
		if (madvise(reg->base + first * l->page_size, len * l->page_size, MADV_DONTNEED)) {
			perror("churn: madvise");
			break;
		}
		c->ops++;
		c->pages += len;
	}
	return NULL;
}

int run_churn(const struct touch_cfg *cfg, unsigned ms, struct churn_result *res)
{
	unsigned T = cfg->threads;
	struct churn_ctx *c = calloc(T + 1, sizeof(*c));
	pthread_t *th = calloc(T + 1, sizeof(*th));
	volatile int stop = 0;
	uint64_t t0 = now_ns();

	if (!c || !th)
		return -ENOMEM;
	memset(res, 0, sizeof(*res));
	for (unsigned t = 0; t <= T; t++) {
		c[t] = (struct churn_ctx){ .cfg = cfg, .stop = &stop,
					   .seed = cfg->seed * 31 + t * 0x9E3779B97F4A7C15ULL };
		if (pthread_create(&th[t], NULL, t < T ? churn_reader : churn_remover, &c[t])) {
			fprintf(stderr, "pthread_create failed\n");
			exit(3);
		}
	}
	nanosleep(&(struct timespec){ .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L },
		  NULL);
	stop = 1;
	for (unsigned t = 0; t <= T; t++)
		pthread_join(th[t], NULL);
	res->seconds = (double)(now_ns() - t0) / 1e9;
	for (unsigned t = 0; t < T; t++) {
		res->reads += c[t].ops;
		res->bad_reads += c[t].bad;
	}
	res->madvises = c[T].ops;
	res->removed_pages = c[T].pages;
	free(c);
	free(th);
	return 0;
}
