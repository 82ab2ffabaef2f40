#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

int uffd_create(uint64_t features, uint64_t *got_features, enum uffd_origin *origin)
{
	int fd = -1, dev, err;
	struct uffdio_api api = { .api = UFFD_API, .features = features };

	dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_NONBLOCK | O_CLOEXEC);
		close(dev);
		if (fd >= 0 && origin)
			*origin = UFFD_VIA_DEV;
	}
	if (fd < 0) {
		fd = (int)syscall(SYS_userfaultfd, O_NONBLOCK | O_CLOEXEC);
		if (fd < 0)
			return -errno;
		if (origin)
			*origin = UFFD_VIA_SYSCALL;
	}
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		err = -errno;
		close(fd);
		return err;
	}
	if (got_features)
		*got_features = api.features;
	return fd;
}

int uffd_register_missing(int uffd, void *addr, size_t len)
{
	struct uffdio_register reg = {
		.range = { .start = (uint64_t)(uintptr_t)addr, .len = len },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};

	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	if (!(reg.ioctls & (1ULL << _UFFDIO_COPY)))
		return -ENOTSUP;
	return 0;
}

uint64_t parse_u64(const char *opt, const char *s)
{
	char *end;
	unsigned long long v;

	if (!s) {
		fprintf(stderr, "option %s needs a value\n", opt);
		exit(64);
	}
	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s || *end || s[0] == '-') {
		fprintf(stderr, "option %s: bad number '%s'\n", opt, s);
		exit(64);
	}
	return v;
}

int pin_thread(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return 0;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set) ? -errno : 0;
}

void affinity_str(char *buf, size_t len)
{
	cpu_set_t set;
	size_t used = 0;

	buf[0] = 0;
	if (sched_getaffinity(0, sizeof(set), &set))
		return;
	for (int c = 0; c < CPU_SETSIZE; c++) {
		int e = c;

		if (!CPU_ISSET(c, &set))
			continue;
		while (e + 1 < CPU_SETSIZE && CPU_ISSET(e + 1, &set))
			e++;
		used += (size_t)snprintf(buf + used, len > used ? len - used : 0,
					 e > c ? "%s%d-%d" : "%s%d", used ? "," : "", c, e);
		if (used >= len)
			break;
		c = e;
	}
}

int json_plain(const char *s)
{
	for (; *s; s++)
		if (*s == '"' || *s == '\\' || (unsigned char)*s < 0x20)
			return 0;
	return 1;
}
