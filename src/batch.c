/*
 * batch.c -- one batch of a projection: one transaction that
 *   1. reads the snapshot and the next window of the log in one statement (read_window),
 *      or takes the window the batch before read ahead (read_ahead, take_ahead),
 *   2. walks the positions by the gap rule (gap.c): contiguous ones are processed, a hole
 *      stops the batch unless a snapshot proved it dead (walk),
 *   3. hands each of our partitions' events to the handler, whose statements are
 *      pipelined behind a marker of the batch transaction (handle_event),
 *   4. checks the handlers left that transaction open (end_pipeline),
 *   5. draws the bound of the holes it noted (draw_bound),
 *   6. writes the checkpoint, fenced by the start position or the leases
 *      (write_checkpoint), and commits; or, with the next window read ahead and nothing
 *      left to decide, queues the checkpoint and the COMMIT and walks the next window while
 *      the server commits (chain).
 * A failure rolls everything back: the checkpoint and the handlers' writes move together.
 */
#include "processor_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FIRST_EVENT_COL 5 /* xmin, head, generation, drawn, mine, then PUP_EVENT_COLUMNS */
#define FIRST_EVENT_ROW 1 /* row 0 is the read's header: xmin, head, generation, drawn */
#define TAG_GUARD (-2)    /* pipeline tag of the statement that checks the batch transaction */
#define TAG_BATCH (-3)    /* pipeline tag of handle_batch's statements */
#define TAG_AHEAD (-4)    /* pipeline tag of the read-ahead of the next window */
#define TAG_CHECKPOINT (-5) /* chain: the checkpoint write queued behind a batch */
#define TAG_COMMIT (-6)     /* chain: its COMMIT */
#define TAG_BEGIN (-7)      /* chain: the next batch's BEGIN */
/* A chained batch's results are read during the next batch (chain): each batch's tags are
 * offset by its base (0 or TAG_STRIDE, alternating), so a failure read then is still the
 * batch's it belongs to (failed_at). Rows stay below TAG_STRIDE / 2 (window_size). */
#define TAG_STRIDE (1L << 24)
#define CHAIN_SECONDS 1.0   /* a chain returns to the run loop (stop, progress) this often */

/* Names the event a handler failure belongs to. */
static int event_error(pup_processor *p, const PGresult *r, int row, pup_error *err) {
    pup_event ev;
    pup_event_from_row(r, row, FIRST_EVENT_COL, &ev);
    if (strcmp(err->sqlstate, "57014") == 0 && p->cfg.statement_timeout_ms > 0)
        pup_error_prefix(err, "handler exceeded its time limit of %d ms: ", p->cfg.statement_timeout_ms);
    int part = pup_partition_of(ev.aggregate_id.p, ev.aggregate_id.len, p->total);
    /* Deadlocks, serialization failures and lost connections are retried; the rest is
     * the event's: its projection's on_error decides (pup_processor_batch). */
    if (!pup_error_is_transient(err)) {
        pup_poison *x = &p->poison;
        if (x->pos != ev.global_position) {
            x->pos = ev.global_position;
            x->attempts = 0;
            x->first = pup_proc_now();
        }
        x->attempts++;
        x->part = part;
        x->fresh = 1;
        snprintf(x->error, sizeof x->error, "%s", err->message);
    }
    pup_error_prefix(err,
                     "projection %s partition %d/%d: handler failed at global position %lld "
                     "(event_type %.*s, event_id %.*s): ",
                     p->name, part, p->total, ev.global_position,
                     (int)(ev.event_type.len > 200 ? 200 : ev.event_type.len), ev.event_type.p,
                     (int)ev.event_id.len, ev.event_id.p);
    if (!pup_error_is_transient(err)) err->code = PUP_ERR_HANDLER;
    return -1;
}

/* The batch transaction is gone (failed: the guard statement failed with err). A lost
 * or ending session leaves no transaction: retried. Else a handler ended it (ROLLBACK,
 * COMMIT, BEGIN after either): the writes of earlier events are gone or were committed
 * apart from the checkpoint. */
static int ended_error(pup_processor *p, int failed, pup_error *err) {
    if (failed && pup_error_is_transient(err)) return pup_proc_context(p, err);
    if (!pup_conn_ok(p->conn)) {
        if (err->code != PUP_ERR_CONNECTION) pup_error_from_pg(err, pup_conn_pg(p->conn), NULL);
        return pup_proc_context(p, err);
    }
    pup_error_set(err, PUP_ERR_HANDLER,
                  "a handler ended or broke the batch transaction (did it send ROLLBACK, COMMIT or BEGIN?);"
                  " batch rolled back, checkpoint not moved");
    return pup_proc_context(p, err);
}

static int run_setup(pup_processor *p, pup_error *err) {
    /* Setups of concurrent processors (partitions, projections sharing tables) run one
     * at a time: CREATE ... IF NOT EXISTS is not safe against itself. */
    if (pup_conn_command(p->conn, "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('pupsourcing.setup', 0))", err) < 0)
        return pup_proc_context(p, err);
    pup_conn_clear_failure(p->conn);
    if (p->h.setup(p->h.ud, p->conn, err) < 0 || pup_conn_failure(p->conn, NULL)) {
        const pup_error *f = pup_conn_failure(p->conn, NULL);
        if (f && err->code != PUP_ERR_HANDLER) *err = *f;
        pup_conn_rollback(p->conn);
        pup_error_prefix(err, "setup failed: ");
        return pup_proc_context(p, err);
    }
    if (pup_conn_commit(p->conn, err) < 0) return pup_proc_context(p, err);
    return 0;
}

/* The checkpoint write's parameters for a batch that moved from `from` to `to`, in
 * p->params. */
static int checkpoint_params(pup_processor *p, long long from, long long to, pup_error *err) {
    pup_params *q = &p->params;
    int group = p->cfg.group;
    if (pup_params_reset(q, group ? 8 : 9) < 0) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    pup_params_text(q, 0, p->name, strlen(p->name));
    pup_params_int(q, 1, p->total);
    if (group) pup_params_text(q, 2, p->held_list, strlen(p->held_list));
    else pup_params_int(q, 2, p->cfg.partition_key);
    pup_params_int(q, 3, to);
    if (p->wait_lo) {
        pup_params_int(q, 4, p->wait_lo);
        pup_params_double(q, 5, p->wait_since);
    }
    pup_params_text(q, 6, p->owner, strlen(p->owner));
    if (group) pup_params_int(q, 7, p->gen);
    else {
        pup_params_int(q, 7, from);
        pup_params_int(q, 8, p->gen);
    }
    return 0;
}

/* Writes the checkpoint(s) of a batch that moved from `from` to `to`; fails when a row
 * moved under us (static), a lease was lost (group) or a reset started a new generation
 * (pup_proc_fenced). */
static int write_checkpoint(pup_processor *p, long long from, long long to, pup_error *err) {
    int group = p->cfg.group;
    const pup_stmt *st = pup_conn_prepare(p->conn, group ? p->sql_lease_checkpoint : p->sql_checkpoint, err);
    if (!st) return pup_store_error(err);
    if (checkpoint_params(p, from, to, err) < 0) return -1;
    PGresult *r = pup_conn_exec(p->conn, st, &p->params, 0, err);
    if (!r) return pup_store_error(err);
    int n = PQntuples(r);
    PQclear(r);
    if (n != (group ? p->nheld : 1)) return pup_proc_fenced(p, from, n, err);
    p->recorded_wait = p->wait_lo;
    return 0;
}

/* Queues a statement prepared before the batch began (preparing inside the pipeline
 * would sync it) behind the handlers' statements. */
static int queue(pup_processor *p, const char *sql, long tag, const pup_params *q, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(p->conn, sql, err);
    if (!st) return -1;
    pup_conn_set_tag(p->conn, tag);
    return pup_conn_send(p->conn, st, q, err);
}

/* Queues the statement that opens the handlers' part of the batch (p->sql_open). */
static int queue_open(pup_processor *p, long tag, pup_error *err) {
    pup_params *q = &p->params;
    if (pup_params_reset(q, 1) < 0) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    pup_params_text(q, 0, p->gen_key, strlen(p->gen_key));
    return queue(p, p->sql_open, tag, q, err);
}

/* Prepares the batch's statements outside the pipeline (a cache lookup once warm); the
 * read last, as later prepares may move the cache. */
static const pup_stmt *prepare_batch(pup_processor *p, pup_error *err) {
    if (!pup_conn_prepare(p->conn, p->sql_open, err) || !pup_conn_prepare(p->conn, p->sql_guard, err) ||
        (p->sql_untimed && !pup_conn_prepare(p->conn, p->sql_untimed, err)) ||
        (!p->cfg.group && (!pup_conn_prepare(p->conn, p->sql_checkpoint_fenced, err) ||
                           !pup_conn_prepare(p->conn, p->sql_generic, err))))
        return NULL;
    return pup_conn_prepare(p->conn, p->sql_read, err);
}

/* A group worker's batch stops in time to commit under its leases: after a third of the
 * TTL, or half of it since the last heartbeat. 0: no deadline. */
static double batch_deadline(const pup_processor *p) {
    if (!p->cfg.group) return 0;
    double ttl = p->cfg.lease_ttl_ms / 1000.0;
    double deadline = pup_proc_mono() + ttl / 3;
    if (p->last_tick + ttl / 2 < deadline) deadline = p->last_tick + ttl / 2;
    return deadline;
}

/* A batch in progress. */
typedef struct walk {
    const PGresult *r;
    int nrows;            /* rows of r: the header, then the window (FIRST_EVENT_ROW on) */
    long long from, last; /* checkpoint before, and the position processed up to */
    long long wait_lo;    /* the first undecided hole (0: none) */
    int nhandle, opened;
    int first_row;        /* the row of the first event handled */
    int dead_row;         /* the row of the event to dead-letter (-1: none) */
    double started;       /* when the batch began (monotonic seconds) */
    double ended;         /* chained: when its COMMIT was queued (0: when it is applied) */
    int nevs;             /* handle_batch: the events to give it, in p->evs (pointing into r) */
    PGresult *ahead;      /* the next window, read ahead from ahead_from (read_ahead) */
    long long ahead_from;
    int ahead_sent;       /* where the next window is read ahead (AHEAD_*) */
    int guarded;          /* the guard was queued */
    long long lo, hi;     /* handle_batch: the positions of its first and last event */
    long base;            /* added to the tags of the batch's statements (TAG_STRIDE) */
    const struct walk *behind; /* the batch chained behind this one, its results unread */
} walk;

enum { AHEAD_NONE, AHEAD_HERE /* queued on p->conn, kept */, AHEAD_BESIDE /* sent on p->reader */ };

/* Whether tag is one of w's statements': *local is then the tag it was given. */
static int owns(const walk *w, long tag, long *local) {
    long t = tag - w->base;
    if (t <= -TAG_STRIDE / 2 || t >= TAG_STRIDE / 2) return 0;
    if (local) *local = t;
    return 1;
}

/* Other partitions' events only advance the position: read enough rows that about
 * batch_size of them are ours, so N partitions commit as often as one. */
static long long window_size(const pup_processor *p) {
    long long window = (long long)p->cfg.batch_size * p->total / (p->nheld ? p->nheld : 1);
    return window > 100000 ? 100000 : window;
}

/* The read's parameters for the window after `from`, in p->params. */
static int window_params(pup_processor *p, long long from, pup_error *err) {
    pup_params *q = &p->params;
    int n = 4;
    if (pup_params_reset(q, 6 + (p->scope[0] != NULL) + (p->scope[1] != NULL)) < 0)
        return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    for (int k = 0; k < 2; k++)
        if (p->scope[k]) pup_params_text(q, n++, p->scope[k], strlen(p->scope[k]));
    pup_params_text(q, n++, p->gen_key, strlen(p->gen_key));
    pup_params_text(q, n, p->name, strlen(p->name));
    pup_params_int(q, 0, from);
    pup_params_int(q, 2, p->total);
    pup_params_text(q, 3, p->held_list, strlen(p->held_list));
    pup_params_int(q, 1, window_size(p));
    return 0;
}

/* Step 1: the snapshot's xmin, the log head and the window after `from`. */
static PGresult *read_window(pup_processor *p, const pup_stmt *st, long long from, pup_error *err) {
    if (window_params(p, from, err) < 0) return NULL;
    PGresult *r = pup_conn_exec(p->conn, st, &p->params, 1, err);
    if (!r) pup_store_error(err);
    return r;
}

/* Read-ahead in catch-up. While the client walks a full window, the server reads the
 * next one: queued first in this batch's pipeline, or, in the run loop while the handlers
 * write, sent on the processor's own second session to run beside their statements
 * (pup_proc_open_reader), it is a snapshot of the log like any other, and using it in the
 * next batch is as if that batch had been slow to start. The
 * next batch takes it only when it starts where this one ended, in the same generation,
 * session and partitions (take_ahead; a change of partitions drops it); its handlers take
 * the generation lock again before they write (sql_open), and its checkpoint write is
 * fenced as always. Static partitions only: a group's partitions move between batches
 * and its batches stop at a deadline, so a window read ahead would rarely be the next. */
static int read_ahead(pup_processor *p, const pup_stmt *st, walk *w, double chain_started, pup_error *err) {
    if (p->cfg.group || w->nrows - FIRST_EVENT_ROW < window_size(p) || p->poison.stop_at || p->wait_lo) return 0;
    w->ahead_from = pup_be_int(PQgetvalue(w->r, w->nrows - 1, FIRST_EVENT_COL), 8);
    if (window_params(p, w->ahead_from, err) < 0) return pup_proc_context(p, err);
    if (chain_started > 0 && p->handlers_wrote && pup_proc_open_reader(p) == 0) {
        pup_error e;
        const pup_stmt *rst = pup_conn_prepare(p->reader, p->sql_read_reader, &e);
        if (rst && pup_conn_send_now(p->reader, rst, &p->params, &e) == 0) {
            w->ahead_sent = AHEAD_BESIDE;
            return 0;
        }
        pup_proc_drop_reader(p, &e);
    }
    pup_conn_set_tag(p->conn, w->base + TAG_AHEAD);
    if (pup_conn_send_kept(p->conn, st, &p->params, err) < 0) return pup_proc_context(p, err);
    w->ahead_sent = AHEAD_HERE;
    return 0;
}

/* The window read ahead by this batch once read: on the other session, waiting for it
 * (NULL when that read failed: the reader is dropped, the next batch reads for itself). */
static PGresult *take_read_ahead(pup_processor *p, const walk *w) {
    if (w->ahead_sent != AHEAD_BESIDE) return pup_conn_take_kept(p->conn);
    pup_error e;
    PGresult *r = pup_conn_take_sent(p->reader, &e);
    if (!r) pup_proc_drop_reader(p, &e);
    return r;
}

/* The window read ahead by the last batch if it is the one after `from` (else NULL).
 * Not an empty one: "caught up" is decided by a fresh read, so an append whose wake-up
 * was taken before this batch is never left to the poll interval. */
static PGresult *take_ahead(pup_processor *p, long long from) {
    PGresult *r = p->ahead;
    p->ahead = NULL;
    if (r && PQntuples(r) > FIRST_EVENT_ROW && p->ahead_from == from && p->ahead_gen == p->gen &&
        p->ahead_session == pup_conn_session(p->conn) && !p->poison.stop_at)
        return r;
    PQclear(r);
    return NULL;
}

/* Names the positions of a failed handle_batch, or the event it said the failure is of. */
static int batch_error(pup_processor *p, const walk *w, long long pos, pup_error *err) {
    for (int i = w->first_row; pos > 0 && i < w->nrows; i++)
        if (pup_be_int(PQgetvalue(w->r, i, FIRST_EVENT_COL), 8) == pos) {
            pup_error_prefix(err, "handle_batch (batch of %d event(s) at global positions %lld..%lld): ", w->nevs,
                             w->lo, w->hi);
            return event_error(p, w->r, i, err);
        }
    pup_error_prefix(err, "projection %s: handle_batch failed on the batch of %d event(s) at global positions "
                     "%lld..%lld: ", p->name, w->nevs, w->lo, w->hi);
    if (!pup_error_is_transient(err)) err->code = PUP_ERR_HANDLER;
    return pup_proc_context(p, err);
}

/* A handler of w failed: the batch behind, whose results may be unread, may have failed
 * first. Read them (a Sync: the batch is rolled back anyway). */
static void read_behind(pup_processor *p, const walk *w) {
    pup_error ignored;
    if (w->behind) pup_conn_pipeline_sync(p->conn, &ignored);
}

/* A failure read from the pipeline (err, and the tag of its statement) named for the
 * batch it belongs to, w or the batch behind it: by its event, its handle_batch or its
 * guard; the read-ahead's and the chain's own statements by the processor. */
static int failed_at(pup_processor *p, const walk *w, long tag, pup_error *err) {
    long t = 0;
    if (w->behind && owns(w->behind, tag, &t)) w = w->behind;
    else if (!owns(w, tag, &t)) return pup_proc_context(p, err);
    if (t == TAG_GUARD) return ended_error(p, 1, err);
    if (t == TAG_BATCH) return batch_error(p, w, 0, err);
    if (t >= FIRST_EVENT_ROW && t < w->nrows) return event_error(p, w->r, (int)t, err);
    return pup_proc_context(p, err);
}

/* Step 3b: handle_batch over the events the walk collected. */
static int run_handle_batch(pup_processor *p, walk *w, pup_error *err) {
    long long pos = 0;
    long tag = 0;
    pup_conn_set_tag(p->conn, w->base + TAG_BATCH);
    int rc = p->h.handle_batch(p->h.ud, p->conn, p->evs, w->nevs, &pos, err);
    if (rc < 0) read_behind(p, w);
    const pup_error *f = pup_conn_failure(p->conn, &tag);
    if (f && !owns(w, tag, NULL)) { /* the batch behind's (chain) */
        *err = *f;
        return failed_at(p, w, tag, err);
    }
    if (rc < 0) return batch_error(p, w, pos, err);
    if (f) {
        *err = *f;
        return batch_error(p, w, 0, err);
    }
    return 0;
}

/* Step 3: one event of the window that passed the gap rule: to the handler if it is
 * ours and new. */
static int handle_event(pup_processor *p, walk *w, int i, long long pos, pup_error *err) {
    const PGresult *r = w->r;
    if (PQgetisnull(r, i, FIRST_EVENT_COL - 1) || !PQgetvalue(r, i, FIRST_EVENT_COL - 1)[0])
        return 0; /* out of scope */
    pup_event ev;
    pup_event_from_row(r, i, FIRST_EVENT_COL, &ev);
    int part = pup_partition_of(ev.aggregate_id.p, ev.aggregate_id.len, p->total);
    if (!p->held[part] || pos <= p->cp[part]) return 0; /* not ours, or done before */
    if (p->old_cp && pos <= p->old_max &&
        pos <= p->old_cp[pup_partition_of(ev.aggregate_id.p, ev.aggregate_id.len, p->old_total)])
        return 0; /* handled under the previous partitioning */
    if (!w->opened && queue_open(p, w->base + i, err) < 0) return pup_proc_context(p, err);
    w->opened = 1;
    if (w->nhandle++ == 0) w->first_row = i;
    if (p->h.handle_batch) { /* given to handle_batch at the end of the walk */
        if (w->nevs == p->capevs) {
            int cap = p->capevs ? p->capevs * 2 : 256;
            pup_event *e = realloc(p->evs, cap * sizeof *e);
            if (!e) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
            p->evs = e;
            p->capevs = cap;
        }
        if (w->nevs == 0) w->lo = pos;
        w->hi = pos;
        p->evs[w->nevs++] = ev;
        return 0;
    }
    pup_conn_set_tag(p->conn, w->base + i);
    long tag;
    int rc = p->h.handle(p->h.ud, p->conn, &ev, err);
    if (rc < 0) read_behind(p, w);
    /* A statement of an earlier event (or of the batch behind) that failed in the
     * pipeline is that event's failure, even when this handler then failed on the
     * aborted transaction. */
    if (pup_conn_failure(p->conn, &tag) && (rc == 0 || tag != w->base + i)) {
        *err = *pup_conn_failure(p->conn, NULL);
        return failed_at(p, w, tag, err);
    }
    if (rc < 0) return event_error(p, r, i, err);
    return 0;
}

/* Step 2: walks the window's positions by the gap rule, handling what passes. */
static int walk_window(pup_processor *p, walk *w, uint64_t xmin, double deadline, pup_error *err) {
    long long seen = w->from;
    for (int i = FIRST_EVENT_ROW; i < w->nrows; i++) {
        if (deadline > 0 && w->nhandle > 0 && pup_proc_mono() > deadline) break; /* commit what is done */
        long long pos = pup_be_int(PQgetvalue(w->r, i, FIRST_EVENT_COL), 8);
        w->wait_lo = pup_gaps_step(&p->gaps, seen, pos, xmin, w->wait_lo);
        seen = pos;
        if (w->wait_lo) continue; /* a transaction that may fill the hole may still be running */
        if (p->poison.stop_at && pos >= p->poison.stop_at) { /* redoing a failed batch */
            if (pos == p->poison.stop_at && p->poison.dead) {
                w->last = pos;
                w->dead_row = i;
            }
            break;
        }
        w->last = pos;
        if (handle_event(p, w, i, pos, err) < 0) return -1;
    }
    return 0;
}

/* The statement that fails unless the batch transaction is still the one open (once). */
static int queue_guard(pup_processor *p, walk *w, pup_error *err) {
    if (!w->opened || w->guarded) return 0;
    w->guarded = 1;
    long tag = w->base + TAG_GUARD;
    if (queue(p, p->sql_guard, tag, NULL, err) < 0 || (p->sql_untimed && queue(p, p->sql_untimed, tag, NULL, err) < 0))
        return pup_proc_context(p, err);
    return 0;
}

/* Step 4: the guard, queued before the Sync (after a handler's ROLLBACK or COMMIT, the
 * statements that follow form an implicit transaction that this failure rolls back at
 * the Sync), then the pipeline's end, failures attributed to their event. */
static int end_pipeline(pup_processor *p, walk *w, pup_error *err) {
    if (queue_guard(p, w, err) < 0) return -1;
    long tag = -1;
    if (pup_conn_pipeline_end(p->conn, err, &tag) < 0) return failed_at(p, w, tag, err);
    if (PQtransactionStatus(pup_conn_pg(p->conn)) != PQTRANS_INTRANS) return ended_error(p, 0, err);
    return 0;
}

/* Step 4 of a batch that may chain: the guard queued, no Sync, and only the results up to
 * the window read ahead read (those of the batch behind among them); this batch's are read
 * with the next one's, whose walk overlaps them. With no Sync between, a guard or handler
 * statement that fails makes the server skip everything queued after it (chain's
 * checkpoint write and COMMIT too) until the rollback. */
static int end_ahead(pup_processor *p, walk *w, pup_error *err) {
    if (queue_guard(p, w, err) < 0) return -1;
    /* the batch behind's results: up to its COMMIT, or (read on p->conn) the window */
    int rc = w->ahead_sent == AHEAD_HERE ? pup_conn_read_kept(p->conn, err)
             : w->behind        ? pup_conn_read_upto(p->conn, w->behind->base + TAG_COMMIT, err)
                                : 0;
    if (rc < 0) return pup_proc_context(p, err);
    long tag = -1;
    const pup_error *f = pup_conn_failure(p->conn, &tag);
    if (f) {
        *err = *f;
        return failed_at(p, w, tag, err);
    }
    w->ahead = take_read_ahead(p, w);
    return 0;
}

/* Step 5: the bound for the holes noted by this batch: an xid drawn after the snapshot
 * that saw them, so above every xid that could fill them; decided by a later batch's
 * snapshot. */
static int draw_bound(pup_processor *p, uint64_t *out, pup_error *err) {
    PGresult *xr = pup_proc_run(p, err, "SELECT pg_current_xact_id()::text", 0);
    if (!xr) return pup_proc_context(p, err);
    *out = strtoull(PQgetvalue(xr, 0, 0), NULL, 10);
    PQclear(xr);
    return 0;
}

/* The event at w->dead_row to the dead-letter table, in the batch transaction (only
 * on the poison path: a round trip there costs nothing on the happy path). */
static int dead_letter(pup_processor *p, walk *w, pup_error *err) {
    const pup_stmt *st = pup_conn_prepare(p->conn, p->store->sql_dead_letter, err);
    if (!st) return pup_proc_context(p, err);
    pup_event ev;
    pup_event_from_row(w->r, w->dead_row, FIRST_EVENT_COL, &ev);
    pup_params *q = &p->params;
    if (pup_params_reset(q, 12) < 0) return pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    const pup_poison *x = &p->poison;
    pup_params_text(q, 0, p->name, strlen(p->name));
    pup_params_int(q, 1, ev.global_position);
    pup_params_int(q, 2, x->part);
    pup_params_int(q, 3, p->total);
    pup_params_text(q, 4, ev.event_id.p, ev.event_id.len);
    pup_params_text(q, 5, ev.event_type.p, ev.event_type.len);
    pup_params_text(q, 6, ev.aggregate_type.p, ev.aggregate_type.len);
    pup_params_text(q, 7, ev.aggregate_id.p, ev.aggregate_id.len);
    pup_params_int(q, 8, ev.aggregate_version);
    pup_params_text(q, 9, x->error, strlen(x->error));
    pup_params_int(q, 10, x->attempts);
    pup_params_double(q, 11, x->first);
    PGresult *r = pup_conn_exec(p->conn, st, q, 0, err);
    if (!r) return pup_proc_context(p, err);
    PQclear(r);
    return 0;
}

/* A group checkpoint write refused: a lost lease is retried after a heartbeat, unless the
 * batch held one event and outlasted the lease TTL for the second time in a row on that
 * event: the batch can only shrink to one event, so it would never commit. */
static int overlong(pup_processor *p, walk *w, pup_error *err) {
    double ms = (pup_proc_mono() - w->started) * 1000;
    if (!p->cfg.group || w->nhandle != 1 || ms < p->cfg.lease_ttl_ms || !pup_conn_ok(p->conn))
        return pup_proc_context(p, err);
    long long pos = pup_be_int(PQgetvalue(w->r, w->first_row, FIRST_EVENT_COL), 8);
    if (p->overlong_pos != pos) {
        p->overlong_pos = pos; /* once may be a stall: retried */
        return pup_proc_context(p, err);
    }
    pup_error_set(err, PUP_ERR_HANDLER,
                  "its batch of this one event took %.0f ms, longer than the lease TTL (%d ms), twice: it can "
                  "never commit under the lease; raise --lease-ttl or make the handler faster",
                  ms, p->cfg.lease_ttl_ms);
    return event_error(p, w->r, w->first_row, err);
}

/* For the lag in seconds: created_at (Unix ms) of the first event after the new
 * checkpoint, from the window (its last row when the head lies beyond it); 0: caught up. */
static long long oldest_pending(const walk *w, long long head) {
    if (w->last >= head || w->nrows <= FIRST_EVENT_ROW) return 0;
    int row = w->nrows - 1;
    for (int i = FIRST_EVENT_ROW; i < w->nrows; i++)
        if (pup_be_int(PQgetvalue(w->r, i, FIRST_EVENT_COL), 8) > w->last) {
            row = i;
            break;
        }
    pup_event ev;
    pup_event_from_row(w->r, row, FIRST_EVENT_COL, &ev);
    return ev.created_at / 1000;
}

/* Whether w may chain (chain_started: when the chain began; 0: not chained): nothing left
 * to decide before its checkpoint (no hole waiting or pending a bound, no dead letter, no
 * poison redone), the next window read ahead (also read_ahead's conditions: static
 * partitions), handlers without side effects outside the database, and time left. Whether
 * that window holds the next events is known once it is read (chain). */
static int may_chain(const pup_processor *p, const walk *w, double chain_started) {
    int undecided = p->wait_lo || p->recorded_wait || pup_gaps_pending(&p->gaps) || w->dead_row >= 0 || p->poison.stop_at;
    return chain_started > 0 && !p->cfg.side_effects && w->ahead_sent && w->last != w->from && !undecided &&
           pup_proc_mono() - chain_started <= CHAIN_SECONDS;
}

/* Steps 2-5 inside the open transaction, with the window read. */
static int batch_body(pup_processor *p, const pup_stmt *st, walk *w, uint64_t xmin, double deadline,
                      double chain_started, int *waiting, pup_error *err) {
    if (pup_conn_pipeline_begin(p->conn, err) < 0) return pup_proc_context(p, err);
    int rc = read_ahead(p, st, w, chain_started, err);
    unsigned long sent = pup_conn_sent(p->conn);
    if (rc == 0) rc = walk_window(p, w, xmin, deadline, err);
    if (rc == 0 && w->nevs > 0) rc = run_handle_batch(p, w, err);
    p->handlers_wrote = pup_conn_sent(p->conn) - sent > (unsigned long)w->opened; /* besides the open */
    *waiting = w->wait_lo != 0;
    if (w->wait_lo != p->wait_lo) p->wait_since = pup_proc_now();
    p->wait_lo = w->wait_lo;
    pup_gaps_forget(&p->gaps, w->last, 0);
    if (rc == 0 && may_chain(p, w, chain_started)) return end_ahead(p, w, err); /* no bound, no dead letter */
    if (rc == 0) rc = end_pipeline(p, w, err);
    if (rc == 0) w->ahead = take_read_ahead(p, w);
    uint64_t bound = 0; /* set by draw_bound before use */
    if (rc == 0 && pup_gaps_pending(&p->gaps) && (rc = draw_bound(p, &bound, err)) == 0)
        pup_gaps_set_bound(&p->gaps, bound);
    if (rc == 0 && w->dead_row >= 0) rc = dead_letter(p, w, err);
    return rc;
}

/* Step 6, chained: when w may chain (it ended by end_ahead, so the pipeline is still open)
 * and the window read ahead holds the next events, the batch queues its checkpoint write (raising when fenced), its COMMIT and the
 * next batch's BEGIN behind its own statements (end_ahead), none of them read, and the next
 * batch walks that window while the server runs them; their results are read with that
 * batch's. Its statements run after the COMMIT, in the same session, so its handlers see
 * this batch's writes as after any COMMIT. Returns 1 when w cannot chain (nothing queued). */
static int chain(pup_processor *p, walk *w, pup_error *err) {
    int next_in_hand = w->ahead && PQntuples(w->ahead) > FIRST_EVENT_ROW && w->ahead_from == w->last;
    if (!next_in_hand || !pup_conn_in_pipeline(p->conn)) return 1;
    const pup_stmt *st = pup_conn_prepare(p->conn, p->sql_checkpoint_fenced, err);
    if (!st || checkpoint_params(p, w->from, w->last, err) < 0) return pup_proc_context(p, err);
    const long tags[3] = {w->base + TAG_CHECKPOINT, w->base + TAG_COMMIT, w->base + TAG_BEGIN};
    int rc = pup_conn_commit_behind(p->conn, st, &p->params, tags, err);
    if (rc == 0 && queue(p, p->sql_generic, w->base + TAG_BEGIN, NULL, err) < 0) rc = -1;
    return rc < 0 ? pup_proc_context(p, err) : rc;
}

/* After a failure of the batch chained behind `prev`: whether prev committed. Its
 * checkpoint and COMMIT were queued before anything of this batch, so it did unless the
 * first failure read is theirs, or the session broke before their results came (the next
 * acquire then reads the checkpoints again). */
static int prev_committed(pup_processor *p) {
    pup_error ignored;
    if (pup_conn_in_pipeline(p->conn)) pup_conn_pipeline_end(p->conn, &ignored, NULL);
    /* its COMMIT's own result, not the first failure recorded: a failure noted without a
     * result (a refused COPY) may come before it */
    return pup_conn_behind_committed(p->conn);
}

/* The checkpoint moved to w->last: held partitions, counts and stats (the duration of a
 * batch that moved it, for the histogram). */
static void moved(pup_processor *p, const walk *w, int *handled, long long *advanced) {
    if (w->last > w->from) {
        static const double bounds[PUP_BATCH_BUCKETS] = PUP_BATCH_BUCKET_BOUNDS;
        double seconds = (w->ended > 0 ? w->ended : pup_proc_mono()) - w->started;
        int b = 0;
        while (b < PUP_BATCH_BUCKETS && seconds > bounds[b]) b++;
        p->stats.batch_buckets[b]++;
        p->stats.batch_us += (long long)(seconds * 1e6);
    }
    for (int k = 0; k < p->total; k++)
        if (p->held[k] && p->cp[k] < w->last) p->cp[k] = w->last;
    *handled += w->nhandle;
    *advanced += w->last - w->from;
    p->stats.handled += w->nhandle;
    p->stats.position = w->last;
    p->stats.waiting_position = p->wait_lo;
}

/* The header of window r (its snapshot's xmin, the head, the last position drawn) into
 * the stats and *xmin, its generation into *gen; -1 when it is malformed. */
static int read_header(pup_processor *p, const PGresult *r, uint64_t *xmin, long long *gen, pup_error *err) {
    if (!pup_window_header_ok(r, FIRST_EVENT_COL, err)) return pup_proc_context(p, err);
    *xmin = strtoull(PQgetvalue(r, 0, 0), NULL, 10);
    p->stats.head = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
    p->stats.drawn = strtoll(PQgetvalue(r, 0, 3), NULL, 10);
    *gen = PQgetisnull(r, 0, 2) ? p->gen : strtoll(PQgetvalue(r, 0, 2), NULL, 10);
    return 0;
}

/* A batch failed: rolled back, with the holes it noted (noted again next time). With
 * `behind`, the batch chained behind failed too if the first failure is its checkpoint's
 * fence. */
static int batch_failed(pup_processor *p, PGresult *r, walk *w, const walk *behind, pup_error *err) {
    long tag = 0, t = 0;
    const pup_error *f = behind ? pup_conn_failure(p->conn, &tag) : NULL;
    int fenced = f && owns(behind, tag, &t) && t == TAG_CHECKPOINT && strcmp(f->sqlstate, "22012") == 0;
    PQclear(r);
    PQclear(w->ahead);
    pup_conn_rollback(p->conn);
    pup_proc_close_reader(p);
    pup_gaps_forget(&p->gaps, 0, 1);
    return fenced ? pup_proc_fenced(p, behind->from, 0, err) : -1;
}

/* The batch's BEGIN; once the read-ahead session is resolved, in the same round trip
 * whether it may still read for this connection (no role set since, no row-level
 * security: pup_proc_resolve_reader): if not, it is closed for good. */
static int begin_batch(pup_processor *p, pup_error *err) {
    if (p->reader_off || !p->sql_begin_check) return pup_conn_command(p->conn, "BEGIN", err);
    PGresult *r = PQexec(pup_conn_pg(p->conn), p->sql_begin_check);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        pup_error_from_pg(err, pup_conn_pg(p->conn), r);
        PQclear(r);
        pup_conn_rollback(p->conn);
        return -1;
    }
    if (strcmp(PQgetvalue(r, 0, 0), "t") != 0) {
        pup_proc_close_reader(p);
        p->reader_off = 1;
    }
    PQclear(r);
    return 0;
}

static int batch_once(pup_processor *p, int chained, int *handled, long long *advanced, int *waiting,
                      pup_error *err) {
    *handled = 0;
    *advanced = 0;
    *waiting = 0;
    if (p->nheld == 0) return 0;
    if (pup_conn_check_utf8(p->conn, err) < 0) return pup_proc_context(p, err);
    if (!p->setup_done && p->h.setup && run_setup(p, err) < 0) return -1;
    p->setup_done = 1;
    if (chained) pup_proc_resolve_reader(p); /* catching up, it reads ahead beside the batch */
    const pup_stmt *st = prepare_batch(p, err);
    if (!st) {
        pup_store_error(err);
        return pup_proc_context(p, err);
    }
    long long from = -1;
    for (int k = 0; k < p->total; k++)
        if (p->held[k] && (from < 0 || p->cp[k] < from)) from = p->cp[k];
    /* The handler time limit is set after the read and lifted before the checkpoint. */
    if (begin_batch(p, err) < 0) return pup_proc_context(p, err);
    pup_conn_clear_failure(p->conn);
    double deadline = batch_deadline(p), started = pup_proc_mono();
    PGresult *r = take_ahead(p, from);
    if (!r) r = read_window(p, st, from, err);
    if (!r) {
        pup_conn_rollback(p->conn);
        return pup_proc_context(p, err);
    }
    walk prev;              /* the batch chained behind this one (chain) */
    PGresult *prev_r = NULL; /* its window, kept until its results are read (failed_at) */
    int behind = 0;         /* 1 while prev's results are not all read */
    for (;;) {
        walk w = {.from = from, .last = from, .started = behind ? pup_proc_mono() : started, .dead_row = -1,
                  .r = r, .nrows = PQntuples(r), .base = behind ? TAG_STRIDE - prev.base : 0,
                  .behind = behind ? &prev : NULL};
        uint64_t xmin = 0;
        long long gen = p->gen;
        int rc = read_header(p, r, &xmin, &gen, err);
        if (rc == 0 && gen == p->gen) rc = batch_body(p, st, &w, xmin, deadline, chained ? started : 0, waiting, err);
        if (behind && ((rc == 0 && gen == p->gen && pup_conn_behind_committed(p->conn)) || prev_committed(p))) {
            moved(p, &prev, handled, advanced);
            behind = 0;
        }
        if (w.behind) { /* failures are named by now */
            PQclear(prev_r);
            prev_r = NULL;
            w.behind = NULL;
        }
        if (rc == 0 && gen != p->gen) { /* reset while we were idle */
            batch_failed(p, r, &w, NULL, err);
            pup_proc_reset_seen(p, gen, err);
            return pup_proc_context(p, err);
        }
        if (rc < 0) return batch_failed(p, r, &w, behind ? &prev : NULL, err);
        p->stats.oldest_pending_ms = oldest_pending(&w, p->stats.head);
        int c = chained ? chain(p, &w, err) : 1;
        /* not chained after all (end_ahead left the pipeline open): its results now */
        if (c < 0 || (c == 1 && pup_conn_in_pipeline(p->conn) && end_pipeline(p, &w, err) < 0))
            return batch_failed(p, r, &w, NULL, err);
        if (c == 0) { /* the next window was read ahead in this transaction: take_ahead's checks */
            prev = w;
            prev.ahead = NULL;
            prev_r = r;
            prev.ended = pup_proc_mono();
            r = w.ahead;
            from = w.last;
            behind = 1;
            if ((st = prepare_batch(p, err)) != NULL) continue;
            pup_store_error(err);
            if (prev_committed(p)) moved(p, &prev, handled, advanced);
            PQclear(prev_r);
            w.ahead = NULL;
            return batch_failed(p, r, &w, NULL, err);
        }
        if (w.last != w.from || p->wait_lo != p->recorded_wait)
            rc = write_checkpoint(p, w.from, w.last, err) < 0 ? overlong(p, &w, err) : 0;
        PQclear(r);
        r = NULL;
        if (rc == 0 && pup_conn_commit(p->conn, err) < 0) rc = pup_proc_context(p, err);
        if (rc < 0) return batch_failed(p, NULL, &w, NULL, err);
        if (w.ahead) { /* for the next batch, if it starts there (take_ahead) */
            p->ahead = w.ahead;
            p->ahead_from = w.ahead_from;
            p->ahead_gen = p->gen;
            p->ahead_session = pup_conn_session(p->conn);
        }
        moved(p, &w, handled, advanced);
        if (!w.ahead || PQntuples(w.ahead) <= FIRST_EVENT_ROW) pup_proc_close_reader(p); /* caught up */
        return 0;
    }
}

/* A batch failed on an event (p->poison) and was rolled back, its projection skips or
 * retries such events: redo it up to the event before, then dead-letter the event in
 * that same transaction (skip, or retry with the attempts used up: returns 0), or leave
 * the checkpoint just before it and return the failure (retry with attempts left: the
 * run loop waits and tries it again). Under "stop" the batch stays rolled back whole. */
static int poisoned(pup_processor *p, int *handled, long long *advanced, int *waiting, pup_error *err) {
    pup_poison *x = &p->poison;
    int max = p->cfg.max_attempts > 0 ? p->cfg.max_attempts : 1;
    int dead = p->cfg.on_error == PUP_ON_ERROR_SKIP || (p->cfg.on_error == PUP_ON_ERROR_RETRY && x->attempts >= max);
    pup_error first = *err;
    long long pos = x->pos, dead_before = x->dead_count;
    x->stop_at = pos;
    x->dead = dead;
    x->fresh = 0;
    int rc = batch_once(p, 0, handled, advanced, waiting, err);
    x->stop_at = 0;
    if (rc == 0 && dead && p->stats.position >= pos) x->dead_count = dead_before + 1;
    if (rc == 0 && !dead) {
        *err = first; /* the event stays: stop, or try it again later */
        x->fresh = 1;
        rc = -1;
    }
    return rc;
}

int pup_processor_batch(pup_processor *p, int *handled, long long *advanced, int *waiting,
                        pup_error *err) {
    return pup_proc_batch(p, 0, handled, advanced, waiting, err);
}

int pup_proc_batch(pup_processor *p, int chained, int *handled, long long *advanced, int *waiting,
                   pup_error *err) {
    p->poison.fresh = 0;
    int rc = batch_once(p, chained, handled, advanced, waiting, err);
    if (rc < 0 && err->code == PUP_ERR_HANDLER) p->stats.handler_errors++; /* skipped ones too */
    if (rc < 0 && p->poison.fresh && err->code == PUP_ERR_HANDLER && p->cfg.on_error != PUP_ON_ERROR_STOP) {
        int before = *handled; /* batches chained before the failure committed */
        long long moved_before = *advanced;
        rc = poisoned(p, handled, advanced, waiting, err);
        *handled += before;
        *advanced += moved_before;
    }
    if (rc == 0 && *advanced > 0 && !p->poison.failure_clear) {
        /* Moving again: the partitions' failure rows go (once per processor: after that,
         * only a failure written by this processor sets it back). */
        char total[16];
        snprintf(total, sizeof total, "%d", p->total);
        PGresult *r = pup_proc_run(p, &(pup_error){0}, p->store->sql_failure_clear, 3, p->name, total, p->held_list);
        if (r) PQclear(r);
        p->poison.failure_clear = r != NULL;
    }
    return rc;
}
