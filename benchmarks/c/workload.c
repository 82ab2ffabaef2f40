/* workload: the faulting process of the handoff benchmark, in the shape of
 * Firecracker's VMM side.  Creates a uffd (EVENT_REMOVE negotiated), mmaps and
 * registers N pages (MISSING), sends the fd + the mapping JSON to the
 * handler's Unix socket, then touches every page from T threads, timing each
 * first touch, verifies the content, and prints one JSON line on stdout.
 *
 * Exit status: 0 ok, 1 verification failed, 2 watchdog timeout (the handler
 * never resolved), 3 setup error, 64 usage. */
#define _GNU_SOURCE
#include "common.h"
#include "pattern.h"
#include "touch.h"

#include <errno.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static volatile const char *stage = "setup";
static unsigned timeout_s = 60;

static void wr(const char *s) { ssize_t r = write(1, s, strlen(s)); (void)r; }

static void on_alarm(int sig)
{
	char num[16];
	int i = sizeof(num) - 1;
	unsigned v = timeout_s;

	(void)sig;
	num[i] = 0;
	do { num[--i] = (char)('0' + v % 10); v /= 10; } while (v && i > 0);
	wr("{\"error\":\"timeout\",\"stage\":\"");
	wr((const char *)stage);
	wr("\",\"timeout_s\":");
	wr(num + i);
	wr("}\n");
	_exit(2);
}

static void fail(const char *what, const char *detail)
{
	printf("{\"error\":\"%s\",\"detail\":\"%s\",\"stage\":\"%s\"}\n", what, detail,
	       (const char *)stage);
	fflush(stdout);
	exit(3);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: workload --socket PATH [--pages N] [--page-size 4096|2097152] [--threads T]\n"
		"                [--order seq|random] [--share chunk|interleave] [--write]\n"
		"                [--regions M] [--close-uffd] [--thread-id] [--no-verify]\n"
		"                [--churn-ms MS] [--timeout S] [--connect-timeout S] [--fault-cpu N] [--seed N] [--label STR]\n"
		"                [--subset PERMILLE [--set-seed N]] [--then-wait FILE]\n"
		"  --subset: touch (and verify) only a fixed random subset of the pages, PERMILLE/1000\n"
		"            of them, chosen by --set-seed; --seed shuffles the order (--order random)\n"
		"  --then-wait: after the touch, wait for FILE to exist, then verify every page\n");
	exit(64);
}

static int connect_retry(const char *path, double timeout_s_)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	uint64_t deadline = now_ns() + (uint64_t)(timeout_s_ * 1e9);

	if (strlen(path) >= sizeof(sa.sun_path))
		fail("socket path too long", path);
	strcpy(sa.sun_path, path);
	for (;;) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

		if (fd < 0)
			fail("socket", strerror(errno));
		if (!connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
			return fd;
		close(fd);
		if ((errno != ENOENT && errno != ECONNREFUSED && errno != EAGAIN) ||
		    now_ns() > deadline)
			fail("connect", strerror(errno));
		nanosleep(&(struct timespec){ .tv_nsec = 10 * 1000 * 1000 }, NULL);
	}
}

static void send_handoff(int sock, int uffd, const char *json, size_t len)
{
	union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } cbuf;
	struct iovec iov = { .iov_base = (void *)json, .iov_len = len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cbuf.b, .msg_controllen = sizeof(cbuf.b) };
	struct cmsghdr *ch = CMSG_FIRSTHDR(&mh);
	ssize_t k;

	memset(cbuf.b, 0, sizeof(cbuf.b));
	ch->cmsg_level = SOL_SOCKET;
	ch->cmsg_type = SCM_RIGHTS;
	ch->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(ch), &uffd, sizeof(int));
	k = sendmsg(sock, &mh, MSG_NOSIGNAL);
	if (k < 0)
		fail("sendmsg", strerror(errno));
	/* the rest of a (very large) array, without the fd */
	while ((size_t)k < len) {
		ssize_t m = send(sock, json + k, len - (size_t)k, MSG_NOSIGNAL);

		if (m < 0)
			fail("send", strerror(errno));
		k += m;
	}
}

int main(int argc, char **argv)
{
	struct touch_cfg cfg = { .threads = 1, .order = ORDER_SEQ, .share = SHARE_CHUNK,
				 .seed = 0x5EED, .fault_cpu = -1 };
	struct touch_result res = { 0 };
	struct layout lay;
	const char *sock_path = NULL, *label = NULL, *then_wait = NULL;
	size_t bad_all = 0;
	uint64_t pages = 16384, ps = 4096, nreg = 1, features, got = 0;
	double conn_timeout = 5;
	int close_uffd = 0, thread_id = 0, verify = 1, uffd, sock, jl;
	enum uffd_origin origin = 0;
	size_t bad = 0;
	unsigned churn_ms = 0;
	struct churn_result churn = { 0 };
	char affinity[128];
	char err[256], *json;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--socket") && v) sock_path = v, i++;
		else if (!strcmp(a, "--pages")) pages = parse_u64(a, v), i++;
		else if (!strcmp(a, "--page-size")) ps = parse_u64(a, v), i++;
		else if (!strcmp(a, "--threads")) cfg.threads = (unsigned)parse_u64(a, v), i++;
		else if (!strcmp(a, "--regions")) nreg = parse_u64(a, v), i++;
		else if (!strcmp(a, "--timeout")) timeout_s = (unsigned)parse_u64(a, v), i++;
		else if (!strcmp(a, "--connect-timeout")) conn_timeout = (double)parse_u64(a, v), i++;
		else if (!strcmp(a, "--churn-ms")) churn_ms = (unsigned)parse_u64(a, v), i++;
		else if (!strcmp(a, "--fault-cpu")) cfg.fault_cpu = (int)parse_u64(a, v), i++;
		else if (!strcmp(a, "--seed")) cfg.seed = parse_u64(a, v), i++;
		else if (!strcmp(a, "--label") && v) label = v, i++;
		else if (!strcmp(a, "--subset")) cfg.subset_permille = (unsigned)parse_u64(a, v), i++;
		else if (!strcmp(a, "--set-seed")) cfg.set_seed = parse_u64(a, v), i++;
		else if (!strcmp(a, "--then-wait") && v) then_wait = v, i++;
		else if (!strcmp(a, "--order") && v && !strcmp(v, "seq")) cfg.order = ORDER_SEQ, i++;
		else if (!strcmp(a, "--order") && v && !strcmp(v, "random")) cfg.order = ORDER_RANDOM, i++;
		else if (!strcmp(a, "--share") && v && !strcmp(v, "chunk")) cfg.share = SHARE_CHUNK, i++;
		else if (!strcmp(a, "--share") && v && !strcmp(v, "interleave")) cfg.share = SHARE_INTERLEAVE, i++;
		else if (!strcmp(a, "--write")) cfg.write = 1;
		else if (!strcmp(a, "--close-uffd")) close_uffd = 1;
		else if (!strcmp(a, "--thread-id")) thread_id = 1;
		else if (!strcmp(a, "--verify")) verify = 1;
		else if (!strcmp(a, "--no-verify")) verify = 0;
		else usage();
	}
	if (cfg.subset_permille > 1000)
		usage();
	if (!sock_path || !pages || !cfg.threads || (ps != 4096 && ps != (2u << 20)) || (label && !json_plain(label)))
		usage();
	if (cfg.threads > pages)
		cfg.threads = (unsigned)pages;

	affinity_str(affinity, sizeof(affinity));
	signal(SIGALRM, on_alarm);
	signal(SIGPIPE, SIG_IGN);
	alarm(timeout_s);

	features = UFFD_FEATURE_EVENT_REMOVE | (thread_id ? UFFD_FEATURE_THREAD_ID : 0);
	uffd = uffd_create(features, &got, &origin);
	if (uffd < 0)
		fail("userfaultfd", strerror(-uffd));
	if (layout_create(&lay, uffd, pages, ps, nreg, err, sizeof(err)))
		fail("layout", err);
	cfg.l = &lay;
	json = malloc(256 * nreg + 16);
	jl = json ? layout_json(&lay, json, 256 * nreg + 16) : -1;
	if (jl < 0)
		fail("json", "buffer");

	stage = "connect";
	sock = connect_retry(sock_path, conn_timeout);
	send_handoff(sock, uffd, json, (size_t)jl);
	if (close_uffd)
		close(uffd);  /* Firecracker keeps its copy; this lets the handler own it */

	stage = "touch";
	if (run_touch(&cfg, &res))
		fail("touch", "out of memory");
	if (churn_ms) {
		stage = "churn";
		if (run_churn(&cfg, churn_ms, &churn))
			fail("churn", "out of memory");
	}
	if (verify) {
		stage = "verify";
		bad = verify_touched(&cfg);
	}
	if (then_wait) {
		stage = "then-wait";
		while (access(then_wait, F_OK))
			nanosleep(&(struct timespec){ .tv_nsec = 1000 * 1000 }, NULL);
		stage = "verify-all";
		bad_all = verify_layout(&lay);
	}
	alarm(0);

	printf("{\"mode\":\"handoff\",");
	if (label)
		printf("\"label\":\"%s\",", label);
	printf("\"affinity\":\"%s\",", affinity);
	print_touch_json(&cfg, &res);
	printf(",\"uffd_via\":\"%s\",\"features_requested\":\"%#llx\",\"features_available\":\"%#llx\",\"thread_id\":%s,\"close_uffd\":%s",
	       origin == UFFD_VIA_DEV ? "dev" : "syscall", (unsigned long long)features,
	       (unsigned long long)got,
	       thread_id ? "true" : "false", close_uffd ? "true" : "false");
	if (cfg.subset_permille)
		printf(",\"subset_permille\":%u,\"set_seed\":%llu", cfg.subset_permille,
		       (unsigned long long)cfg.set_seed);
	if (then_wait)
		printf(",\"verified_all\":%s,\"bad_words_all\":%zu", bad_all ? "false" : "true",
		       bad_all);
	if (churn_ms)
		printf(",\"churn\":{\"seconds\":%.3f,\"madvises\":%llu,\"removed_pages\":%llu,"
		       "\"reads\":%llu,\"bad_reads\":%llu}", churn.seconds,
		       (unsigned long long)churn.madvises, (unsigned long long)churn.removed_pages,
		       (unsigned long long)churn.reads, (unsigned long long)churn.bad_reads);
	if (verify)
		printf(",\"verified\":%s,\"bad_words\":%zu}\n", bad ? "false" : "true", bad);
	else
		printf(",\"verified\":null}\n");
	fflush(stdout);
	close(sock);
	return bad || bad_all || churn.bad_reads ? 1 : 0;
}
