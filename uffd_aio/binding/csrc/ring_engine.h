/* Internal glue between the ring shim (native.c) and the native fault
 * engine (engine.c); not part of the cffi cdef.
 *
 * The engine owns the io_uring user_data values with UA_ENGINE_UD_TAG set
 * (the Ring's own values are small counters): such a value is the address
 * of an engine operation ORed with the tag.  ua_reap() hands their CQEs to
 * the engine's cqe() (struct ua_ring_eng_ops) in C, so they never reach Python; when an engine queued
 * messages for Python (a fault its READ could not serve), ua_reap() sets
 * bit UA_ENG_FLAG_PYTHON in the ring's flags (ua_ring_engine_flags). */
#ifndef UA_RING_ENGINE_H
#define UA_RING_ENGINE_H

#include <stdint.h>

#define UA_ENGINE_UD_TAG (1ULL << 63)
#define UA_ENG_FLAG_PYTHON 1u

struct ua_ring;
struct ua_engine;

/* native.c: prep one engine SQE (0, or -EBUSY when the SQ stays full after a
 * submit); counts it in flight until its CQE is routed back */
int ua_ring_eng_prep(struct ua_ring *r, int op, int fd, uint64_t addr, uint32_t len,
		     uint64_t off, uint64_t user_data);
int ua_ring_eng_submit(struct ua_ring *r);
unsigned ua_ring_sq_ready(struct ua_ring *r); /* also in native.h (the cdef) */
/* What the ring calls in the engines, given at link time: the ring shim
 * depends on no symbol of engine.c (the dependency runs one way). */
struct ua_ring_eng_ops {
	/* a CQE of an engine (user_data has the tag); returns UA_ENG_FLAG_PYTHON
	 * when its engine now has messages for Python */
	uint32_t (*cqe)(uint64_t user_data, int32_t res);
	/* the ring is being freed: no more SQEs, and no CQE will come back */
	void (*ring_gone)(struct ua_engine *e);
};
/* attach/detach an engine: a ring being freed tells its engines (every engine
 * of a ring passes the same ops) */
int ua_ring_eng_link(struct ua_ring *r, struct ua_engine *e, const struct ua_ring_eng_ops *ops);
void ua_ring_eng_unlink(struct ua_ring *r, struct ua_engine *e);
/* Submit, then wait (at most timeout_ms) until pending(arg) is 0, routing
 * engine CQEs to their engines and keeping the others for ua_reap. */
int ua_ring_eng_settle(struct ua_ring *r, int (*pending)(void *), void *arg, int timeout_ms);

#endif
