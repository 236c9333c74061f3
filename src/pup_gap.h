/*
 * pup_gap.h -- the gap rule (gap.c), pure code: no database, no I/O. docs/ordering.md
 * explains it; processors apply it to each batch they read (batch.c). Also the look at
 * positions drawn above the head that followers take between reads (end of this file).
 *
 * Positions come from a sequence drawn before commit, so a transaction still running
 * leaves a hole below positions that are already visible. A batch may pass a hole only
 * once no transaction that could fill it can still commit. Each hole [lo, hi] is noted
 * with a bound: an xid the processor drew after the snapshot that saw the hole, so above
 * the xid of every writer that could fill it. Once a later snapshot's xmin is above the
 * bound, those writers have all ended and the hole is dead (rolled back) or filled.
 *
 * The xmax trap: a snapshot's own xmax is NOT such a bound. PostgreSQL computes it as
 * the latest completed xid + 1, so a running writer's xid can be at or above it.
 */
#ifndef PUP_GAP_H
#define PUP_GAP_H

#include <stdint.h>

#define PUP_GAP_PENDING UINT64_MAX /* bound not drawn yet */
#define PUP_MAX_GAPS 64            /* holes noted at once; more are noted later */

typedef struct pup_gap {
    long long lo, hi;
    uint64_t bound; /* PUP_GAP_PENDING until the batch that noted it draws its xid */
} pup_gap;

/* The noted holes, oldest first; several are decided by one batch. Zero-initialised. */
typedef struct pup_gaps {
    pup_gap g[PUP_MAX_GAPS];
    int n;
} pup_gaps;

/* The noted hole that contains [lo, hi], or NULL. */
pup_gap *pup_gaps_find(pup_gaps *s, long long lo, long long hi);

/* One step of a batch's walk over the visible positions: the batch has seen up to
 * `seen`, the next visible position is `pos`, read under a snapshot whose xmin is
 * `xmin`; wait_lo is the first undecided hole so far (0: none). Notes a new hole and
 * returns the new wait_lo: seen + 1 when this is the first hole that may still fill
 * (new, or its bound not passed by xmin), else wait_lo unchanged. Holes past the first
 * undecided one are only noted, so the next batch can step over all that died at once. */
long long pup_gaps_step(pup_gaps *s, long long seen, long long pos, uint64_t xmin,
                        long long wait_lo);

/* 1 when a hole with a drawn bound is decided by a snapshot with this xmin. */
int pup_gap_dead(const pup_gap *g, uint64_t xmin);

/* Drops the holes at or below `passed` (the checkpoint moved past them); with
 * pending_only, drops instead those still without a bound (their batch rolled back). */
void pup_gaps_forget(pup_gaps *s, long long passed, int pending_only);

/* 1 when a noted hole still waits for its bound. */
int pup_gaps_pending(const pup_gaps *s);

/* Gives every pending hole the bound `xid`, drawn after the snapshot that saw them. */
void pup_gaps_set_bound(pup_gaps *s, uint64_t xid);

/* Positions drawn above the head belong to appends not yet committed (or rolled back). An
 * append outside a transaction may leave its wake-up to another's, which can come before
 * its own commit (docs/ordering.md, "Wake-ups"). So a follower whose read found nothing new
 * looks again soon, 2 ms doubling to 50 ms, for PUP_DRAWN_LOOK_SECONDS from when a new last
 * position was drawn or news came; after that (a rollback's positions stay drawn), or with
 * none drawn, it waits for a wake-up or its poll interval. Processors (run_loop.c) and
 * pup.subscribe (lua_store.c) share it. Zero-initialised. */
#define PUP_DRAWN_LOOK_SECONDS 1.0

typedef struct pup_drawn_look {
    long long drawn; /* the last drawn position looked for (0: none, or news since) */
    double since;    /* when that look started (monotonic seconds) */
    double wait;     /* its last wait (seconds) */
} pup_drawn_look;

/* The wait in seconds before the next read, after one that found nothing new: in_flight
 * is the last position drawn if it is above what the read saw (else 0), now the monotonic
 * time, poll the follower's poll interval (also the longest wait returned). */
double pup_drawn_look_wait(pup_drawn_look *l, long long in_flight, double now, double poll);

/* News (a wake-up, events read): the next wait starts the look again. */
void pup_drawn_look_restart(pup_drawn_look *l);

#endif
