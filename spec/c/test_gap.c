/*
 * test_gap.c -- the gap rule (gap.c) alone, without a database: holes, their bounds, the
 * xmin decisions, the xmax trap, many holes at once and the PUP_MAX_GAPS overflow. Each
 * case walks positions as a batch does (pup_gaps_step) and checks where it stops. Also the
 * look at positions drawn above the head (pup_drawn_look_wait). Prints TAP; exits non-zero
 * on any failure.
 */
#include <stdio.h>
#include <string.h>

#include "pup_gap.h"
#include "tap.h"

static void ok(int cond, const char *what) { tap_ok(cond, what, NULL); }

/* Walks the visible positions vis[0..n) after `from` as a batch does; returns the first
 * undecided hole (0: none) and sets *last to the position processed up to. */
static long long walk(pup_gaps *s, long long from, const long long *vis, int n, uint64_t xmin,
                      long long *last) {
    long long seen = from, wait_lo = 0;
    *last = from;
    for (int i = 0; i < n; i++) {
        wait_lo = pup_gaps_step(s, seen, vis[i], xmin, wait_lo);
        seen = vis[i];
        if (!wait_lo) *last = vis[i];
    }
    pup_gaps_forget(s, *last, 0);
    return wait_lo;
}

static void contiguous(void) {
    pup_gaps s = {0};
    long long vis[] = {1, 2, 3}, last;
    ok(walk(&s, 0, vis, 3, 100, &last) == 0 && last == 3 && s.n == 0,
       "contiguous positions: no hole, all processed");
}

/* A new hole always stops the batch, whatever the xmin: its writers' xids are unknown
 * until the batch draws its own. */
static void new_hole_waits(void) {
    pup_gaps s = {0};
    long long vis[] = {1, 2, 4, 5}, last;
    long long w = walk(&s, 0, vis, 4, 1000000, &last);
    ok(w == 3 && last == 2, "a new hole stops the batch below it");
    ok(s.n == 1 && s.g[0].lo == 3 && s.g[0].hi == 3 && s.g[0].bound == PUP_GAP_PENDING,
       "the hole is noted with a pending bound");
    ok(pup_gaps_pending(&s), "pending until the batch draws its xid");
    /* The batch rolled back: its holes are noted again next time. */
    pup_gaps_forget(&s, 0, 1);
    ok(s.n == 0, "a rolled-back batch forgets the holes it noted");
}

/* The bound decides: xmin <= bound waits, xmin > bound passes. */
static void bound_decides(void) {
    pup_gaps s = {0};
    long long vis[] = {1, 2, 4, 5}, last;
    walk(&s, 0, vis, 4, 90, &last);
    pup_gaps_set_bound(&s, 120); /* the xid the batch drew after its snapshot */
    ok(!pup_gaps_pending(&s) && s.g[0].bound == 120, "the drawn xid becomes the bound");
    ok(walk(&s, 2, vis + 2, 2, 110, &last) == 3 && last == 2, "xmin below the bound: still waiting");
    ok(walk(&s, 2, vis + 2, 2, 120, &last) == 3 && last == 2, "xmin equal to the bound: still waiting");
    ok(!pup_gap_dead(&s.g[0], 120) && pup_gap_dead(&s.g[0], 121), "dead only once xmin > bound");
    ok(walk(&s, 2, vis + 2, 2, 121, &last) == 0 && last == 5, "xmin above the bound: passed");
    ok(s.n == 0, "a passed hole is forgotten");
    pup_gap pending = {3, 3, PUP_GAP_PENDING};
    ok(!pup_gap_dead(&pending, UINT64_MAX - 1), "a hole without a bound is never dead");
}

/* A hole that fills is simply contiguous on the next read. */
static void hole_fills(void) {
    pup_gaps s = {0};
    long long vis[] = {1, 2, 4}, last;
    walk(&s, 0, vis, 3, 90, &last);
    pup_gaps_set_bound(&s, 95);
    long long filled[] = {3, 4};
    ok(walk(&s, 2, filled, 2, 91, &last) == 0 && last == 4 && s.n == 0,
       "a filled hole is passed and forgotten, whatever the xmin");
}

/* The xmax trap: writer 107 is running while the batch's snapshot has xmax 105 (the
 * latest completed xid + 1). A bound of 105 would let a snapshot with xmin 106 (107
 * still running) pass the hole; the xid the batch draws after its snapshot (108) is
 * above every running writer's, so the hole waits until 107 ends. */
static void xmax_trap(void) {
    pup_gaps s = {0};
    long long vis[] = {1, 2, 4}, last;
    walk(&s, 0, vis, 3, 100, &last);
    pup_gaps_set_bound(&s, 108);
    ok(walk(&s, 2, vis + 2, 1, 106, &last) == 3, "writer 107 still running (xmin 106): waiting");
    ok(walk(&s, 2, vis + 2, 1, 107, &last) == 3, "xmin 107 (the writer itself): waiting");
    ok(walk(&s, 2, vis + 2, 1, 109, &last) == 0 && last == 4, "every writer ended (xmin 109): passed");
}

/* Many holes: the first undecided one stops the batch; the ones beyond it are noted, so
 * a later batch steps over every one that died at once. */
static void many_holes(void) {
    pup_gaps s = {0};
    long long vis[] = {1, 3, 5, 8, 10}, last;
    ok(walk(&s, 0, vis, 5, 50, &last) == 2 && last == 1, "stops at the first of many holes");
    ok(s.n == 4 && s.g[0].lo == 2 && s.g[1].lo == 4 && s.g[2].lo == 6 && s.g[2].hi == 7 && s.g[3].lo == 9,
       "every hole is noted, oldest first, with its whole range");
    pup_gaps_set_bound(&s, 60);
    ok(walk(&s, 1, vis + 1, 4, 61, &last) == 0 && last == 10 && s.n == 0,
       "one later snapshot passes all of them at once");

    /* Holes noted in different batches have different bounds: the older may be dead
     * while the newer still waits. */
    pup_gaps t = {0};
    long long a[] = {1, 3};
    walk(&t, 0, a, 2, 50, &last);
    pup_gaps_set_bound(&t, 60);
    long long b[] = {3, 5};
    ok(walk(&t, 1, b, 2, 55, &last) == 2, "the older hole waits for its own bound");
    pup_gaps_set_bound(&t, 70); /* the batch that saw hole 4 draws its xid */
    ok(t.n == 2 && t.g[0].bound == 60 && t.g[1].bound == 70, "each hole keeps the bound of its batch");
    ok(walk(&t, 1, b, 2, 65, &last) == 4 && last == 3, "xmin 65: the older hole passed, the newer waits");
    ok(t.n == 1 && t.g[0].lo == 4, "only the passed hole is forgotten");
}

/* More holes than PUP_MAX_GAPS: the extra ones are not noted now, still stop nothing
 * they should not (they lie above the first undecided hole), and are noted later. */
static void overflow(void) {
    pup_gaps s = {0};
    enum { N = PUP_MAX_GAPS + 10 };
    long long vis[N], last;
    for (int i = 0; i < N; i++) vis[i] = 2 * (i + 1); /* holes at 1, 3, 5, ... */
    ok(walk(&s, 0, vis, N, 10, &last) == 1 && last == 0, "stops at the first hole");
    ok(s.n == PUP_MAX_GAPS && s.g[PUP_MAX_GAPS - 1].lo == 2 * PUP_MAX_GAPS - 1,
       "at most PUP_MAX_GAPS holes noted");
    pup_gaps_set_bound(&s, 20);
    /* Xmin passed the bound: the noted holes are dead; the first unnoted one is new and
     * stops the batch right above the last noted one. */
    long long w = walk(&s, 0, vis, N, 21, &last);
    ok(w == 2 * PUP_MAX_GAPS + 1 && last == 2 * PUP_MAX_GAPS, "passes the noted holes, waits at the first unnoted");
    ok(s.n == 0, "the passed holes are forgotten; the list was full, so the rest is not noted yet");
    w = walk(&s, last, vis + PUP_MAX_GAPS, N - PUP_MAX_GAPS, 21, &last);
    ok(w == 2 * PUP_MAX_GAPS + 1 && s.n == N - PUP_MAX_GAPS && s.g[0].bound == PUP_GAP_PENDING,
       "the next batch notes the rest, pending, and still waits");
}

/* The wait in ms (rounded) of one look at `in_flight` at time `now`. */
static int look_ms(pup_drawn_look *l, long long in_flight, double now, double poll) {
    return (int)(pup_drawn_look_wait(l, in_flight, now, poll) * 1000 + 0.5);
}

/* Positions drawn above the head: looked at again 2 ms doubling to 50 ms, for one second
 * from a new last position drawn or news; never longer than the poll interval. */
static void drawn_look(void) {
    pup_drawn_look l = {0};
    ok(look_ms(&l, 0, 10, 60) == 60000, "nothing in flight: the poll interval");
    int steps[] = {2, 4, 8, 16, 32, 50, 50}, good = 1;
    for (int i = 0; i < 7; i++) good &= look_ms(&l, 7, 10 + i * 0.1, 60) == steps[i];
    ok(good, "in flight: 2 ms doubling to 50 ms");
    ok(look_ms(&l, 7, 11.01, 60) == 60000, "the same position after a second: the poll interval");
    ok(look_ms(&l, 9, 11.02, 60) == 2, "a new last position drawn: the look starts again");
    ok(look_ms(&l, 9, 12.5, 60) == 60000, "...for a second");
    pup_drawn_look_restart(&l);
    ok(look_ms(&l, 9, 12.6, 60) == 2, "news: the look at the same position starts again");
    ok(look_ms(&l, 9, 12.7, 0.001) == 1, "never longer than the poll interval");
}

int main(void) {
    contiguous();
    new_hole_waits();
    bound_decides();
    hole_fills();
    xmax_trap();
    many_holes();
    overflow();
    drawn_look();
    return tap_done();
}
