/*
 * Loop-stall watchdog.
 *
 * A Python thread that touches registered memory while holding the GIL
 * deadlocks an in-process pager: the faulting thread sleeps in the kernel,
 * and the event loop that would resolve the fault waits for the GIL.  No
 * Python code runs any more, so only a native thread can notice.  This one
 * watches for work waiting for the loop (the ring fd readable: completions;
 * or the uffd readable: a message the io_uring read has not picked up, as
 * when the loop thread itself faulted and its task_work cannot run) and a
 * heartbeat the loop bumps each time it drains the ring.  When work waits
 * and the heartbeat stands still for the timeout, it writes the message to
 * stderr once per stall.  It never touches Python state.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "watchdog.h"

struct ua_watchdog {
    int ring_fd;
    int uffd;
    const volatile uint64_t *heartbeat;
    unsigned timeout_ms;
    volatile int stop;
    volatile unsigned fired;
    pthread_t thread;
    char *message;
};

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void *watchdog_main(void *arg)
{
    struct ua_watchdog *w = arg;
    uint64_t last = *w->heartbeat, since = now_ms();
    int reported = 0;
    const struct timespec tick = { 0, 50 * 1000 * 1000 };

    while (!w->stop) {
        struct pollfd pfd[2] = { { .fd = w->ring_fd, .events = POLLIN },
                                 { .fd = w->uffd, .events = POLLIN } };
        uint64_t cur = *w->heartbeat;

        nanosleep(&tick, NULL);
        if (cur != last || poll(pfd, w->uffd >= 0 ? 2 : 1, 0) <= 0) {
            /* the loop ran, or it has nothing to do: not a stall */
            last = cur;
            since = now_ms();
            reported = 0;
            continue;
        }
        if (!reported && now_ms() - since >= w->timeout_ms) {
            size_t len = strlen(w->message), off = 0;

            while (off < len) {
                ssize_t n = write(2, w->message + off, len - off);

                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0)
                    break;
                off += (size_t)n;
            }
            w->fired++;
            reported = 1;
        }
    }
    return NULL;
}

struct ua_watchdog *ua_watchdog_start(int ring_fd, int uffd, const volatile uint64_t *heartbeat,
                                      unsigned timeout_ms, const char *message)
{
    struct ua_watchdog *w = calloc(1, sizeof(*w));

    if (!w)
        return NULL;
    w->ring_fd = ring_fd;
    w->uffd = uffd;
    w->heartbeat = heartbeat;
    w->timeout_ms = timeout_ms;
    w->message = strdup(message);
    if (!w->message || pthread_create(&w->thread, NULL, watchdog_main, w)) {
        free(w->message);
        free(w);
        return NULL;
    }
    return w;
}

unsigned ua_watchdog_fired(struct ua_watchdog *w)
{
    return w->fired;
}

void ua_watchdog_stop(struct ua_watchdog *w)
{
    w->stop = 1;
    pthread_join(w->thread, NULL);
    free(w->message);
    free(w);
}
