/* Loop-stall watchdog: a native thread that needs no GIL (see watchdog.c). */
struct ua_watchdog;
struct ua_watchdog *ua_watchdog_start(int ring_fd, int uffd, const volatile uint64_t *heartbeat,
                                      unsigned timeout_ms, const char *message);
unsigned ua_watchdog_fired(struct ua_watchdog *w);
void ua_watchdog_stop(struct ua_watchdog *w);
