/* inproc: the in-process C reference.  One process: a handler thread running
 * the same loop as ref_handler on a uffd the process made itself, plus T
 * faulting threads.  Same JSON line as `workload`, with the handler's
 * statistics under "handler".  --baseline: no uffd at all, plain anonymous
 * first-touch faults (the kernel floor, same JSON with "mode":"baseline").
 *
 * Exit status: 0 ok, 1 verification failed, 2 watchdog timeout, 3 setup
 * error, 64 usage. */
#define _GNU_SOURCE
#include "common.h"
#include "handler.h"
#include "pattern.h"
#include "touch.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

static unsigned timeout_s = 60;

static void on_alarm(int sig)
{
	static const char msg[] = "{\"error\":\"timeout\",\"stage\":\"inproc\"}\n";
	ssize_t r;

	(void)sig;
	r = write(1, msg, sizeof(msg) - 1);
	(void)r;
	_exit(2);
}

static void fail(const char *what, const char *detail)
{
	printf("{\"error\":\"%s\",\"detail\":\"%s\"}\n", what, detail);
	fflush(stdout);
	exit(3);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: inproc [--pages N] [--page-size 4096|2097152] [--threads T] [--order seq|random]\n"
		"              [--share chunk|interleave] [--write] [--regions M]\n"
		"              [--readahead N] [--snapshot-mib N] [--thread-id] [--no-verify] [--baseline]\n"
		"              [--churn-ms MS] [--timeout S] [--fault-cpu N] [--handler-cpu N] [--seed N] [--label STR]\n");
	exit(64);
}

struct hthread {
	int uffd, peer;
	struct bench_mapping *m;
	size_t n;
	struct serve_opts opts;
	struct serve_stats st;
	int ret, cpu;
};

static void *handler_main(void *arg)
{
	struct hthread *h = arg;

	if (pin_thread(h->cpu))
		fprintf(stderr, "warning: cannot pin the handler to CPU %d\n", h->cpu);
	h->ret = serve_uffd(h->uffd, h->peer, h->m, h->n, &h->opts, &h->st);
	return NULL;
}

int main(int argc, char **argv)
{
	struct touch_cfg cfg = { .threads = 1, .order = ORDER_SEQ, .share = SHARE_CHUNK,
				 .seed = 0x5EED, .fault_cpu = -1 };
	struct touch_result res = { 0 };
	struct hthread h = { .opts = { .readahead = 1 } };
	struct layout lay;
	const char *label = NULL;
	uint64_t pages = 16384, ps = 4096, nreg = 1, snap_mib = 0, got = 0, features;
	int thread_id = 0, verify = 1, sp[2];
	enum uffd_origin origin = 0;
	pthread_t ht;
	size_t bad = 0;
	unsigned churn_ms = 0;
	int handler_cpu = -1, baseline = 0;
	struct churn_result churn = { 0 };
	char affinity[128];
	char err[256];

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--pages")) pages = parse_u64(a, v), i++;
		else if (!strcmp(a, "--page-size")) ps = parse_u64(a, v), i++;
		else if (!strcmp(a, "--threads")) cfg.threads = (unsigned)parse_u64(a, v), i++;
		else if (!strcmp(a, "--regions")) nreg = parse_u64(a, v), i++;
		else if (!strcmp(a, "--readahead")) h.opts.readahead = (unsigned)parse_u64(a, v), i++;
		else if (!strcmp(a, "--snapshot-mib")) snap_mib = parse_u64(a, v), i++;
		else if (!strcmp(a, "--timeout")) timeout_s = (unsigned)parse_u64(a, v), i++;
		else if (!strcmp(a, "--churn-ms")) churn_ms = (unsigned)parse_u64(a, v), i++;
		else if (!strcmp(a, "--handler-cpu")) handler_cpu = (int)parse_u64(a, v), i++;
		else if (!strcmp(a, "--fault-cpu")) cfg.fault_cpu = (int)parse_u64(a, v), i++;
		else if (!strcmp(a, "--seed")) cfg.seed = parse_u64(a, v), i++;
		else if (!strcmp(a, "--label") && v) label = v, i++;
		else if (!strcmp(a, "--order") && v && !strcmp(v, "seq")) cfg.order = ORDER_SEQ, i++;
		else if (!strcmp(a, "--order") && v && !strcmp(v, "random")) cfg.order = ORDER_RANDOM, i++;
		else if (!strcmp(a, "--share") && v && !strcmp(v, "chunk")) cfg.share = SHARE_CHUNK, i++;
		else if (!strcmp(a, "--share") && v && !strcmp(v, "interleave")) cfg.share = SHARE_INTERLEAVE, i++;
		else if (!strcmp(a, "--write")) cfg.write = 1;
		else if (!strcmp(a, "--thread-id")) thread_id = 1;
		else if (!strcmp(a, "--baseline")) baseline = 1;
		else if (!strcmp(a, "--verify")) verify = 1;
		else if (!strcmp(a, "--no-verify")) verify = 0;
		else usage();
	}
	if (!pages || !cfg.threads || (ps != 4096 && ps != (2u << 20)) || !h.opts.readahead ||
	    h.opts.readahead > 4096 || (label && !json_plain(label)))
		usage();
	if (cfg.threads > pages)
		cfg.threads = (unsigned)pages;

	affinity_str(affinity, sizeof(affinity));
	signal(SIGALRM, on_alarm);
	alarm(timeout_s);

	if (snap_mib) {
		uint8_t *snap = mmap(NULL, snap_mib << 20, PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

		if (snap == MAP_FAILED)
			fail("mmap snapshot", strerror(errno));
		pattern_fill(snap, 0, snap_mib << 20);
		h.opts.snap = snap;
		h.opts.snap_len = snap_mib << 20;
	}
	if (baseline) {
		if (layout_create(&lay, -1, pages, ps, nreg, err, sizeof(err)))
			fail("layout", err);
		cfg.l = &lay;
		if (run_touch(&cfg, &res))
			fail("touch", "out of memory");
		alarm(0);
		printf("{\"mode\":\"baseline\",");
		if (label)
			printf("\"label\":\"%s\",", label);
		printf("\"affinity\":\"%s\",", affinity);
		print_touch_json(&cfg, &res);
		printf(",\"verified\":null}\n");
		return 0;
	}
	features = UFFD_FEATURE_EVENT_REMOVE | (thread_id ? UFFD_FEATURE_THREAD_ID : 0);
	h.uffd = uffd_create(features, &got, &origin);
	if (h.uffd < 0)
		fail("userfaultfd", strerror(-h.uffd));
	if (layout_create(&lay, h.uffd, pages, ps, nreg, err, sizeof(err)))
		fail("layout", err);
	cfg.l = &lay;
	h.n = lay.nreg;
	h.m = calloc(h.n, sizeof(*h.m));
	if (!h.m)
		fail("calloc", "mappings");
	for (size_t k = 0; k < h.n; k++)
		h.m[k] = (struct bench_mapping){ .base = (uint64_t)(uintptr_t)lay.reg[k].base,
						 .size = lay.reg[k].pages * ps,
						 .offset = lay.reg[k].first * ps, .page_size = ps };
	if (alloc_bitmaps(h.m, h.n))
		fail("calloc", "bitmaps");
	/* the handler stops when our end of this pair closes, as ref_handler
	 * stops when its client hangs up */
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp))
		fail("socketpair", strerror(errno));
	h.peer = sp[1];
	h.cpu = handler_cpu;
	if (pthread_create(&ht, NULL, handler_main, &h))
		fail("pthread_create", "handler");

	if (run_touch(&cfg, &res))
		fail("touch", "out of memory");
	if (churn_ms && run_churn(&cfg, churn_ms, &churn))
		fail("churn", "out of memory");
	if (verify)
		bad = verify_layout(&lay);
	close(sp[0]);
	pthread_join(ht, NULL);
	alarm(0);

	printf("{\"mode\":\"inproc\",");
	if (label)
		printf("\"label\":\"%s\",", label);
	printf("\"affinity\":\"%s\",", affinity);
	print_touch_json(&cfg, &res);
	printf(",\"handler_cpu\":%d,\"readahead\":%u,\"snapshot\":%s,\"uffd_via\":\"%s\",\"features_requested\":\"%#llx\",\"features_available\":\"%#llx\","
	       "\"thread_id\":%s,",
	       handler_cpu, h.opts.readahead, h.opts.snap ? "true" : "false",
	       origin == UFFD_VIA_DEV ? "dev" : "syscall", (unsigned long long)features,
	       (unsigned long long)got,
	       thread_id ? "true" : "false");
	if (churn_ms)
		printf("\"churn\":{\"seconds\":%.3f,\"madvises\":%llu,\"removed_pages\":%llu,"
		       "\"reads\":%llu,\"bad_reads\":%llu},", churn.seconds,
		       (unsigned long long)churn.madvises, (unsigned long long)churn.removed_pages,
		       (unsigned long long)churn.reads, (unsigned long long)churn.bad_reads);
	if (verify)
		printf("\"verified\":%s,\"bad_words\":%zu,", bad ? "false" : "true", bad);
	else
		printf("\"verified\":null,");
	printf("\"handler\":{\"result\":\"%s\",", h.ret ? strerror(-h.ret) : "ok");
	print_serve_stats(stdout, &h.st);
	printf("}}\n");
	fflush(stdout);
	return bad || churn.bad_reads || h.ret ? 1 : 0;
}
