/* ref_handler: the C reference uffd handler, in the shape of Firecracker's
 * example handler.  Listens on a Unix socket; per client receives ONE message
 * (the uffd via SCM_RIGHTS + a JSON array of mappings) and serves faults until
 * the client hangs up; then waits for the next client (or exits: --once).
 *
 *   ref_handler [--once] [--readahead N] [--snapshot-mib N] [--quiet] SOCKET
 *
 * Per client, one JSON line of statistics goes to stderr (unless --quiet). */
#define _GNU_SOURCE
#include "common.h"
#include "handler.h"
#include "pattern.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_JSON (1 << 20)

static const char *sock_path;

static void on_signal(int sig)
{
	(void)sig;
	if (sock_path)
		unlink(sock_path);
	_exit(0);
}

static void usage(void)
{
	fprintf(stderr,
		"usage: ref_handler [--once] [--readahead N] [--snapshot-mib N] [--cpu N] [--quiet] SOCKET\n"
		"  --cpu N           pin the handler to CPU N\n"
		"  --readahead N     copy up to N pages per fault, from the faulting page on (default 1)\n"
		"  --snapshot-mib N  pre-populate an N MiB pattern buffer and copy from it (like\n"
		"                    Firecracker's MAP_POPULATE'd snapshot); default: generate the\n"
		"                    pattern into a scratch buffer per copy\n"
		"  --once            serve one client, then exit\n");
	exit(64);
}

/* Receive the handoff: one fd + the JSON text (possibly split across several
 * stream reads).  Returns the uffd or -1 (message in err). */
static int recv_handoff(int conn, char *buf, size_t cap, size_t *len, char *err, size_t errlen)
{
	int uffd = -1, depth = 0, started = 0;
	size_t have = 0;

	for (;;) {
		union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int) * 8)]; } cbuf;
		struct iovec iov = { .iov_base = buf + have, .iov_len = cap - 1 - have };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
				     .msg_control = cbuf.b, .msg_controllen = sizeof(cbuf.b) };
		struct pollfd pfd = { .fd = conn, .events = POLLIN };
		ssize_t k;

		if (have + 1 >= cap) {
			snprintf(err, errlen, "handoff message larger than %zu bytes", cap);
			goto fail;
		}
		if (poll(&pfd, 1, 10000) <= 0) {
			snprintf(err, errlen, "no handoff message within 10 s");
			goto fail;
		}
		k = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			snprintf(err, errlen, "recvmsg: %s", strerror(errno));
			goto fail;
		}
		for (struct cmsghdr *ch = CMSG_FIRSTHDR(&mh); ch; ch = CMSG_NXTHDR(&mh, ch)) {
			if (ch->cmsg_level != SOL_SOCKET || ch->cmsg_type != SCM_RIGHTS)
				continue;
			size_t nfd = (ch->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			int *fds = (int *)CMSG_DATA(ch);

			for (size_t i = 0; i < nfd; i++) {
				if (uffd < 0)
					uffd = fds[i];
				else
					close(fds[i]); /* protocol sends exactly one */
			}
		}
		if (k == 0) {
			snprintf(err, errlen, "peer closed before the mapping array was complete");
			goto fail;
		}
		for (ssize_t i = 0; i < k; i++) {
			char ch = buf[have + (size_t)i];

			if (ch == '[') {
				depth++;
				started = 1;
			} else if (ch == ']') {
				depth--;
			}
		}
		have += (size_t)k;
		if (started && depth <= 0)
			break;
	}
	if (uffd < 0) {
		snprintf(err, errlen, "handoff message carried no file descriptor");
		return -1;
	}
	buf[have] = 0;
	*len = have;
	return uffd;
fail:
	if (uffd >= 0)
		close(uffd);
	return -1;
}

/* The fd must be a userfaultfd (anon inode "[userfaultfd]"). */
static int is_uffd(int fd)
{
	char path[64], target[64];
	ssize_t k;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	k = readlink(path, target, sizeof(target) - 1);
	if (k < 0)
		return 0;
	target[k] = 0;
	return strstr(target, "userfaultfd") != NULL;
}

int main(int argc, char **argv)
{
	struct serve_opts opts = { .readahead = 1 };
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int once = 0, quiet = 0, lfd, cpu = -1;
	uint64_t snap_mib = 0, client = 0;
	char *json;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--once"))
			once = 1;
		else if (!strcmp(argv[i], "--quiet"))
			quiet = 1;
		else if (!strcmp(argv[i], "--readahead"))
			opts.readahead = (unsigned)parse_u64(argv[i], argv[i + 1]), i++;
		else if (!strcmp(argv[i], "--cpu"))
			cpu = (int)parse_u64(argv[i], argv[i + 1]), i++;
		else if (!strcmp(argv[i], "--snapshot-mib"))
			snap_mib = parse_u64(argv[i], argv[i + 1]), i++;
		else if (argv[i][0] == '-')
			usage();
		else if (!sock_path)
			sock_path = argv[i];
		else
			usage();
	}
	if (!sock_path || !opts.readahead || opts.readahead > 4096)
		usage();
	if (strlen(sock_path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "ref_handler: socket path too long\n");
		return 1;
	}
	if (snap_mib) { /* the "snapshot file", populated up front */
		uint8_t *snap = mmap(NULL, snap_mib << 20, PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

		if (snap == MAP_FAILED) {
			perror("ref_handler: mmap snapshot");
			return 1;
		}
		pattern_fill(snap, 0, snap_mib << 20);
		opts.snap = snap;
		opts.snap_len = snap_mib << 20;
	}
	if (pin_thread(cpu)) {
		fprintf(stderr, "ref_handler: cannot pin to CPU %d\n", cpu);
		return 1;
	}
	json = malloc(MAX_JSON);
	if (!json)
		return 1;

	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	signal(SIGPIPE, SIG_IGN);
	strcpy(sa.sun_path, sock_path);
	unlink(sock_path);
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 16) < 0) {
		fprintf(stderr, "ref_handler: %s: %s\n", sock_path, strerror(errno));
		return 1;
	}

	for (;;) {
		struct ucred cred = { 0 };
		socklen_t cl = sizeof(cred);
		struct bench_mapping *m = NULL;
		struct serve_stats st = { 0 };
		char err[256];
		size_t n = 0, len = 0;
		uint64_t t0;
		int conn, uffd, r;

		conn = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("ref_handler: accept");
			return 1;
		}
		client++;
		getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &cl);
		uffd = recv_handoff(conn, json, MAX_JSON, &len, err, sizeof(err));
		if (uffd >= 0 && !is_uffd(uffd))
			snprintf(err, sizeof(err), "the file descriptor received is not a userfaultfd");
		if (uffd < 0 || !is_uffd(uffd) || parse_mappings(json, len, &m, &n, err, sizeof(err))) {
			fprintf(stderr, "{\"client\":%" PRIu64 ",\"peer_pid\":%d,\"error\":\"%s\"}\n",
				client, (int)cred.pid, err);
			if (uffd >= 0)
				close(uffd);
			close(conn);
			if (once)
				return 1;
			continue;
		}
		t0 = now_ns();
		r = serve_uffd(uffd, conn, m, n, &opts, &st);
		if (!quiet) {
			fprintf(stderr,
				"{\"client\":%" PRIu64 ",\"peer_pid\":%d,\"mappings\":%zu,"
				"\"readahead\":%u,\"cpu\":%d,\"served_s\":%.3f,\"result\":\"%s\",",
				client, (int)cred.pid, n, opts.readahead, cpu,
				(double)(now_ns() - t0) / 1e9, r ? strerror(-r) : "peer closed");
			print_serve_stats(stderr, &st);
			fprintf(stderr, "}\n");
		}
		close(uffd);
		close(conn);
		free_mappings(m, n);
		if (once)
			return r ? 1 : 0;
	}
}
