/*
 * gap.c -- the gap rule of docs/ordering.md as pure code (see pup_gap.h): which holes a
 * batch noted, which it may pass, and when a hole is decided. No database here: the
 * batch (batch.c) feeds it positions, snapshot xmins and its own xids; spec/c/test_gap.c
 * tests it alone.
 */
#include "pup_gap.h"

#include <stddef.h>

pup_gap *pup_gaps_find(pup_gaps *s, long long lo, long long hi) {
    for (int k = 0; k < s->n; k++)
        if (s->g[k].lo <= lo && s->g[k].hi >= hi) return &s->g[k];
    return NULL;
}

/* Notes the hole [lo, hi] with a pending bound; ignored when PUP_MAX_GAPS are noted (it
 * is noted again by a later batch, once earlier ones are gone). */
static void note(pup_gaps *s, long long lo, long long hi) {
    if (s->n == PUP_MAX_GAPS) return; /* noted when the earlier ones are gone */
    s->g[s->n++] = (pup_gap){lo, hi, PUP_GAP_PENDING};
}

long long pup_gaps_step(pup_gaps *s, long long seen, long long pos, uint64_t xmin,
                        long long wait_lo) {
    if (pos == seen + 1) return wait_lo;
    pup_gap *g = pup_gaps_find(s, seen + 1, pos - 1);
    if (!g) note(s, seen + 1, pos - 1);
    /* A new hole may still fill; a noted one until a snapshot's xmin passes its bound. */
    if (!wait_lo && (!g || xmin <= g->bound)) return seen + 1;
    return wait_lo;
}

int pup_gap_dead(const pup_gap *g, uint64_t xmin) {
    return g->bound != PUP_GAP_PENDING && xmin > g->bound;
}

void pup_gaps_forget(pup_gaps *s, long long passed, int pending_only) {
    int n = 0;
    for (int k = 0; k < s->n; k++) {
        pup_gap *g = &s->g[k];
        int drop = pending_only ? g->bound == PUP_GAP_PENDING : g->hi <= passed;
        if (!drop) s->g[n++] = *g;
    }
    s->n = n;
}

int pup_gaps_pending(const pup_gaps *s) {
    for (int k = 0; k < s->n; k++)
        if (s->g[k].bound == PUP_GAP_PENDING) return 1;
    return 0;
}

void pup_gaps_set_bound(pup_gaps *s, uint64_t xid) {
    for (int k = 0; k < s->n; k++)
        if (s->g[k].bound == PUP_GAP_PENDING) s->g[k].bound = xid;
}

double pup_drawn_look_wait(pup_drawn_look *l, long long in_flight, double now, double poll) {
    if (in_flight <= 0) return poll;
    if (in_flight != l->drawn) {
        l->drawn = in_flight;
        l->since = now;
        l->wait = 0.002;
    } else if (now - l->since > PUP_DRAWN_LOOK_SECONDS) {
        return poll;
    } else {
        l->wait = l->wait * 2 > 0.05 ? 0.05 : l->wait * 2;
    }
    return l->wait < poll ? l->wait : poll;
}

void pup_drawn_look_restart(pup_drawn_look *l) {
    l->drawn = 0;
}
