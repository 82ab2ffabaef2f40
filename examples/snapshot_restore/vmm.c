/* vmm: a stand-in for a VMM (Firecracker) restoring a microVM from a memory snapshot
 * whose pages are served by `uffd-aio serve --backend file:SNAPSHOT`.
 *
 *   vmm make-snapshot FILE MIB        write a MIB MiB snapshot with a known pattern
 *   vmm restore --socket PATH --snapshot FILE [--mib 64] [--regions 2] [--threads 4]
 *               [--balloon zero|refetch] [--timeout 30]
 *
 * restore does what Firecracker does on snapshot load with a Uffd memory backend:
 *   1. mmap the guest memory (anonymous, private; here in --regions pieces with a
 *      hole between them, like the 32-bit MMIO gap of a real guest),
 *   2. create a userfaultfd (EVENT_REMOVE, for the balloon) and register every
 *      region MISSING,
 *   3. connect to the page server's Unix socket and send ONE message: the uffd
 *      (SCM_RIGHTS) and the JSON array of {base_host_virt_addr, size, offset,
 *      page_size, page_size_kib} (page_size_kib is legacy and holds bytes),
 *   4. run "vCPUs": --threads threads that each touch their share of the pages and
 *      compare every byte with the snapshot file (guest memory past the end of
 *      the snapshot must read as zeros),
 *   5. optionally play balloon: MADV_DONTNEED a range (the server receives a
 *      REMOVE event) and check what the range reads as afterwards,
 *   6. print stats.  Exit status: 0 ok, 1 wrong content, 2 timeout, 3 setup error.
 *
 * The pattern: the 8-byte little-endian word at snapshot offset o is
 *   ((o / 8) * 0x9E3779B97F4A7C15 mod 2^64) XOR 0x5546464441494F21,
 * the formula of uffd_aio.testing and benchmarks/c/pattern.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#define PAGE 4096UL
#define MIB (1UL << 20)

static uint64_t pattern_word(uint64_t off)
{
	return ((off >> 3) * 0x9E3779B97F4A7C15ULL) ^ 0x5546464441494F21ULL;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "vmm: %s: %s\n", what, strerror(errno));
	exit(3);
}

static void on_alarm(int sig)
{
	static const char msg[] = "vmm: timeout: pages were not served in time\n";
	ssize_t r = write(2, msg, sizeof(msg) - 1);

	(void)sig;
	(void)r;
	_exit(2);
}

/* ---- make-snapshot ------------------------------------------------------- */

static int make_snapshot(const char *path, unsigned long mib)
{
	static uint64_t buf[MIB / 8];
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0)
		die(path);
	for (unsigned long m = 0; m < mib; m++) {
		for (size_t i = 0; i < MIB / 8; i++)
			buf[i] = pattern_word(m * MIB + i * 8);
		if (write(fd, buf, MIB) != (ssize_t)MIB)
			die("write snapshot");
	}
	close(fd);
	printf("vmm: wrote %lu MiB snapshot %s\n", mib, path);
	return 0;
}

/* ---- guest memory ----------------------------------------------------------- */

struct region {
	uint8_t *base;
	size_t size;
	size_t offset; /* in the snapshot */
};

struct guest {
	struct region reg[8];
	int nreg;
	size_t pages;
	const uint8_t *snap; /* the snapshot file, mapped read-only, for checking */
	size_t snap_size;
};

/* Address and snapshot offset of guest page i (pages are numbered across regions). */
static uint8_t *page_addr(const struct guest *g, size_t i, size_t *offset)
{
	for (int r = 0; r < g->nreg; r++) {
		size_t n = g->reg[r].size / PAGE;

		if (i < n) {
			*offset = g->reg[r].offset + i * PAGE;
			return g->reg[r].base + i * PAGE;
		}
		i -= n;
	}
	abort();
}

/* Does the page at addr hold snapshot offset off (or zeros past its end)? */
static int page_ok(const struct guest *g, const uint8_t *addr, size_t off, int expect_zero)
{
	static const uint8_t zeros[PAGE];

	if (expect_zero || off >= g->snap_size)
		return !memcmp(addr, zeros, PAGE);
	return !memcmp(addr, g->snap + off, PAGE) &&
	       *(const uint64_t *)addr == pattern_word(off);
}

static int uffd_open(uint64_t features)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC), fd;

	if (dev >= 0) {
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		close(dev);
	} else {
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	}
	if (fd < 0)
		die("userfaultfd (needs root, vm.unprivileged_userfaultfd=1 or /dev/userfaultfd access)");
	if (ioctl(fd, UFFDIO_API, &api))
		die("UFFDIO_API");
	return fd;
}

static void guest_create(struct guest *g, int uffd, size_t mib, int nreg)
{
	size_t total = mib * MIB, done = 0;
	/* reserve everything plus a 1-page hole after each region, then map the regions */
	uint8_t *p = mmap(NULL, total + (size_t)nreg * PAGE, PROT_NONE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	if (p == MAP_FAILED)
		die("mmap reserve");
	g->nreg = nreg;
	g->pages = total / PAGE;
	for (int r = 0; r < nreg; r++) {
		struct region *rg = &g->reg[r];
		struct uffdio_register reg;

		rg->size = (total / PAGE / (size_t)nreg + (r < (int)(total / PAGE % (size_t)nreg))) * PAGE;
		rg->offset = done;
		rg->base = mmap(p, rg->size, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
		if (rg->base == MAP_FAILED)
			die("mmap region");
		reg = (struct uffdio_register){ .range = { (uintptr_t)rg->base, rg->size },
						.mode = UFFDIO_REGISTER_MODE_MISSING };
		if (ioctl(uffd, UFFDIO_REGISTER, &reg))
			die("UFFDIO_REGISTER");
		done += rg->size;
		p += rg->size + PAGE;
	}
}

/* ---- the handoff (Firecracker's message) ------------------------------------- */

static int handoff(const char *path, int uffd, const struct guest *g)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char json[4096];
	int len = 0, sock;
	union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } cbuf = { 0 };
	struct iovec iov;
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
			     .msg_control = cbuf.b, .msg_controllen = sizeof(cbuf.b) };
	struct cmsghdr *ch;

	len += snprintf(json + len, sizeof(json) - (size_t)len, "[");
	for (int r = 0; r < g->nreg; r++)
		len += snprintf(json + len, sizeof(json) - (size_t)len,
				"%s{\"base_host_virt_addr\":%lu,\"size\":%zu,\"offset\":%zu,"
				"\"page_size\":%lu,\"page_size_kib\":%lu}",
				r ? "," : "", (unsigned long)(uintptr_t)g->reg[r].base,
				g->reg[r].size, g->reg[r].offset, PAGE, PAGE);
	len += snprintf(json + len, sizeof(json) - (size_t)len, "]");

	if (strlen(path) >= sizeof(sa.sun_path)) {
		errno = ENAMETOOLONG;
		die(path);
	}
	strcpy(sa.sun_path, path);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0 || connect(sock, (struct sockaddr *)&sa, sizeof(sa)))
		die("connect to the page server");

	iov = (struct iovec){ json, (size_t)len };
	ch = CMSG_FIRSTHDR(&mh);
	ch->cmsg_level = SOL_SOCKET;
	ch->cmsg_type = SCM_RIGHTS;
	ch->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(ch), &uffd, sizeof(int));
	if (sendmsg(sock, &mh, MSG_NOSIGNAL) != len)
		die("sendmsg");
	return sock; /* kept open: the server serves us until it reads EOF */
}

/* ---- vCPUs -------------------------------------------------------------------- */

struct vcpu {
	pthread_t th;
	const struct guest *g;
	int id, n;
	uint64_t *lat; /* ns of each first touch, indexed by page */
	size_t bad;
	pthread_barrier_t *go;
};

static void *vcpu_run(void *arg)
{
	struct vcpu *v = arg;
	const struct guest *g = v->g;

	/* each vCPU walks its own contiguous share of guest memory */
	size_t first = g->pages * (size_t)v->id / (size_t)v->n;
	size_t end = g->pages * (size_t)(v->id + 1) / (size_t)v->n;

	pthread_barrier_wait(v->go);
	for (size_t i = first; i < end; i++) {
		size_t off;
		volatile uint8_t *a = page_addr(g, i, &off);
		uint64_t t0 = now_ns();

		(void)a[0]; /* the fault: blocks until the server copied the page in */
		v->lat[i] = now_ns() - t0;
		v->bad += !page_ok(g, (const uint8_t *)a, off, 0);
	}
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

/* ---- balloon: give a range back, see what it reads as afterwards --------------- */

static size_t balloon(const struct guest *g, int expect_zero)
{
	const struct region *r = &g->reg[g->nreg - 1];
	size_t len = r->size / 4 / PAGE * PAGE, bad = 0;

	if (madvise(r->base, len, MADV_DONTNEED)) /* the server gets a REMOVE event */
		die("madvise");
	for (size_t o = 0; o < len; o += PAGE)
		bad += !page_ok(g, r->base + o, r->offset + o, expect_zero);
	printf("vmm: balloon: %zu MiB given back and touched again, read as %s: %s\n",
	       len / MIB, expect_zero ? "zeros" : "the snapshot", bad ? "WRONG" : "ok");
	return bad;
}

static void usage(void)
{
	fprintf(stderr, "usage: vmm make-snapshot FILE MIB\n"
			"       vmm restore --socket PATH --snapshot FILE [--mib 64] [--regions 2]\n"
			"                   [--threads 4] [--balloon zero|refetch] [--timeout 30]\n");
	exit(64);
}

int main(int argc, char **argv)
{
	const char *sock_path = NULL, *snap_path = NULL, *balloon_mode = NULL;
	unsigned long mib = 64, nreg = 2, threads = 4, timeout = 30;
	struct guest g = { 0 };
	struct stat st;
	struct vcpu *v;
	pthread_barrier_t go;
	uint64_t *lat, t0, wall;
	size_t bad = 0;
	int uffd, sock, fd;

	if (argc == 4 && !strcmp(argv[1], "make-snapshot"))
		return make_snapshot(argv[2], strtoul(argv[3], NULL, 10));
	if (argc < 2 || strcmp(argv[1], "restore"))
		usage();
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (!val)
			usage();
		if (!strcmp(a, "--socket")) sock_path = val;
		else if (!strcmp(a, "--snapshot")) snap_path = val;
		else if (!strcmp(a, "--mib")) mib = strtoul(val, NULL, 10);
		else if (!strcmp(a, "--regions")) nreg = strtoul(val, NULL, 10);
		else if (!strcmp(a, "--threads")) threads = strtoul(val, NULL, 10);
		else if (!strcmp(a, "--timeout")) timeout = strtoul(val, NULL, 10);
		else if (!strcmp(a, "--balloon")) balloon_mode = val;
		else usage();
		i++;
	}
	if (!sock_path || !snap_path || !mib || !nreg || nreg > 8 || !threads || threads > 256 ||
	    (balloon_mode && strcmp(balloon_mode, "zero") && strcmp(balloon_mode, "refetch")))
		usage();
	signal(SIGALRM, on_alarm);
	alarm((unsigned)timeout);

	fd = open(snap_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st))
		die(snap_path);
	g.snap_size = (size_t)st.st_size;
	g.snap = g.snap_size ? mmap(NULL, g.snap_size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
	if (g.snap == MAP_FAILED)
		die("mmap snapshot");
	close(fd);

	uffd = uffd_open(UFFD_FEATURE_EVENT_REMOVE);
	guest_create(&g, uffd, mib, (int)nreg);
	sock = handoff(sock_path, uffd, &g);
	/* Keep our copy of the uffd open, as Firecracker does.  Were it closed, and the
	 * server's copy closed too (bad handoff, server exit), the kernel would unregister
	 * the memory and the vCPUs would silently read zero pages instead of the snapshot;
	 * with it open they wait, and the alarm reports the timeout. */
	printf("vmm: pid %d restored %lu MiB in %lu regions from %s (%zu MiB), "
	       "pages served by %s\n", getpid(), mib, nreg, snap_path, g.snap_size / MIB, sock_path);

	lat = calloc(g.pages, sizeof(*lat));
	v = calloc(threads, sizeof(*v));
	if (!lat || !v)
		die("calloc");
	pthread_barrier_init(&go, NULL, (unsigned)threads + 1);
	for (unsigned long t = 0; t < threads; t++) {
		v[t] = (struct vcpu){ .g = &g, .id = (int)t, .n = (int)threads, .lat = lat, .go = &go };
		if (pthread_create(&v[t].th, NULL, vcpu_run, &v[t]))
			die("pthread_create");
	}
	t0 = now_ns();
	pthread_barrier_wait(&go);
	for (unsigned long t = 0; t < threads; t++) {
		pthread_join(v[t].th, NULL);
		bad += v[t].bad;
	}
	wall = now_ns() - t0;
	qsort(lat, g.pages, sizeof(*lat), cmp_u64);
	printf("vmm: %lu vCPU threads touched %zu pages in %.3f s (%.1f MiB/s); "
	       "first-touch latency p50 %.1f us, p99 %.1f us, max %.1f us\n",
	       threads, g.pages, (double)wall / 1e9, (double)(g.pages * PAGE) / MIB / ((double)wall / 1e9),
	       (double)lat[g.pages / 2] / 1e3, (double)lat[g.pages * 99 / 100] / 1e3,
	       (double)lat[g.pages - 1] / 1e3);
	printf("vmm: content check against the snapshot: %s (%zu bad pages)\n",
	       bad ? "FAILED" : "ok", bad);
	if (balloon_mode)
		bad += balloon(&g, !strcmp(balloon_mode, "zero"));
	alarm(0);
	close(sock);
	return bad ? 1 : 0;
}
