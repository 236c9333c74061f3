/*
 * processor_internal.h -- what the processor's files share (not installed). A processor
 * is split by concern:
 *   processor.c  the object: configuration, the SQL texts it owns, the partitions held
 *   batch.c      one batch: read, walk by the gap rule, handlers, checkpoint, commit
 *   gap.c        the gap rule itself and the look at drawn positions, pure (pup_gap.h)
 *   lease.c      taking partitions: the static lock, the worker group's lease protocol
 *   run_loop.c   the loop around batches: standby, waiting for NOTIFY, retries
 * Names here are pup_proc_*: internal to the library, not part of its API.
 */
#ifndef PUP_PROCESSOR_INTERNAL_H
#define PUP_PROCESSOR_INTERNAL_H

#include "pup_gap.h"
#include "pup_processor.h"

#define PUP_MAX_PARTITIONS 4096

/* The lease protocol's statements (lease.c), built once per processor; prepared per
 * connection through the statement cache. Only char * fields: lease.c checks and frees
 * them as an array. */
typedef struct pup_lease_sql {
    char *lock_timeout, *unlease_mine, *end_dead, *register_me, *forget_dead,
        *live, *old_checkpoints, *settle_reset, *init_rows, *release_others, *lease,
        *drop_old, *unregister, *static_lock, *static_unlock, *static_checkpoint,
        /* the layout registry (claim_layout) and the generation fence */
        *layout_insert, *layout_share, *layout_update, *layout_legacy, *layout_switch,
        *layout_settled, *static_live, *group_live, *generation;
} pup_lease_sql;

/* Poison events (batch.c, run_loop.c): the event whose handler failed last and how
 * often in a row; while a failed batch is redone, where it stops (stop_at) and whether
 * it dead-letters the event there. */
typedef struct pup_poison {
    long long pos;      /* global position of the event (0: none yet) */
    int part, attempts; /* its partition; failures on it in a row in this process */
    double first;       /* when it first failed (wall clock) */
    int fresh;          /* the last batch failed on this event (a handler failure) */
    long long stop_at;  /* > 0 while redoing: handle only the events before it */
    int dead;           /* ... and dead-letter the event at stop_at */
    long long dead_count; /* events dead-lettered by this processor */
    double retry_at;    /* on_error = "retry": the next attempt not before (monotonic) */
    int failure_clear;  /* no failure row of ours is left (cleared or never written) */
    char error[4096];   /* the handler's message, with its traceback */
} pup_poison;

struct pup_processor {
    const pup_store *store;
    pup_conn *conn;
    pup_projection_cfg cfg;
    char *name;
    pup_handler h;
    char *sql_read, *sql_checkpoint, *sql_checkpoint_fenced, *sql_lease_checkpoint;
    /* Queued around the handlers of a batch: open marks the batch transaction (and sets
     * the handler time limit); guard fails unless that transaction is still the one open;
     * the time limit is then lifted for the checkpoint write. */
    char *sql_open;
    char *sql_hole; /* while waiting at a hole: has it filled, or have its writers ended? */
    const char *sql_guard, *sql_untimed;
    /* What the BEGIN of a chained batch is followed by: its window reads planned
     * generically (processor.c, SQL_GENERIC). */
    const char *sql_generic;
    char *scope[2]; /* aggregate and event types as text[] literals; NULL: any */
    pup_lease_sql lease;
    char owner[160]; /* this worker: host/pid/random */
    char *gen_key; /* advisory lock text a batch shares and a reset takes (pup_proc_gen_key) */
    long long gen; /* the generation (reset count) the checkpoints held belong to; 0: none yet */
    int reload;    /* static: a reset was noticed, claim the layout and read the row again */
    pup_params params;
    pup_event *evs; /* handle_batch's events of the batch in progress (kept for the next) */
    int capevs;
    /* The window after ahead_from, read ahead by the last batch in generation ahead_gen
     * and session ahead_session (batch.c, read_ahead); NULL: none. */
    PGresult *ahead;
    long long ahead_from, ahead_gen;
    unsigned long ahead_session;
    /* The session that reads the next window beside the batch's statements in catch-up
     * (pup_proc_open_reader), and its window read; reader_off: none (for good, or until a
     * lost session is opened again). Used while the handlers write (handlers_wrote: those
     * of the last batch sent statements): else the read on p->conn is as early, and a
     * third busy process would slow the client's walk. */
    pup_conn *reader;
    char *sql_read_reader, *sql_begin_check;
    int reader_off, handlers_wrote;
    int setup_done, locked, listening;
    unsigned long session; /* pup_conn_session() when `locked`/`listening` were taken */
    /* The partitions held, with their checkpoints (valid where held). */
    int total;
    unsigned char *held;
    long long *cp;
    int nheld;
    char *held_list; /* "{1,5,9}" for SQL */
    /* Group mode: next heartbeat, and the checkpoints of the partitioning before a
     * repartition, honoured until every new partition has passed them. */
    double next_tick, last_tick;
    int old_total;
    long long *old_cp, old_max;
    pup_gaps gaps;
    long long wait_lo; /* the first undecided hole (0: none), and since when */
    double wait_since;
    long long recorded_wait; /* waiting_position last written to the checkpoint row */
    pup_drawn_look drawn_look; /* run_loop.c's look at positions drawn above the head */
    /* Group: the event whose one-event batch outlasted the lease (0: none). A second such
     * batch in a row on it stops the worker: it can never commit under its lease. */
    long long overlong_pos;
    pup_processor_stats stats;
    pup_poison poison;
};

/* processor.c */
double pup_proc_now(void);  /* wall clock, seconds */
double pup_proc_mono(void); /* monotonic clock, seconds */
/* Prefixes err's message with the projection and what it holds; returns -1. */
int pup_proc_context(pup_processor *p, pup_error *err);
/* Runs sql with n text parameters (NULL = SQL NULL); the result, or NULL with err. */
PGresult *pup_proc_run(pup_processor *p, pup_error *err, const char *sql, int n, ...);
/* Sizes the per-partition arrays for total partitions, none held; -1 out of memory. */
int pup_proc_set_total(pup_processor *p, int total);
/* Marks partition k held with checkpoint pos (call pup_proc_held_done after). */
void pup_proc_hold(pup_processor *p, int k, long long pos);
void pup_proc_held_done(pup_processor *p); /* rebuilds held_list */
void pup_proc_drop_all(pup_processor *p);
/* Forgets the previous partitioning's checkpoints (repartition settled). */
void pup_proc_forget_old(pup_processor *p);
/* Builds p->sql_read_reader (once; outside a batch: a statement on p->conn). */
void pup_proc_resolve_reader(pup_processor *p);
/* Opens p->reader if needed: 0 when it is open; -1 when it cannot be (not resolved, or it
 * failed to connect: then not tried again). */
int pup_proc_open_reader(pup_processor *p);
/* Closes p->reader (caught up, or a failed batch: it may still be sending a window, with a
 * snapshot held); opened again when needed. */
void pup_proc_close_reader(pup_processor *p);
/* Closes p->reader, which failed: the read-ahead runs on p->conn (until it is opened again
 * after a lost session). */
void pup_proc_drop_reader(pup_processor *p, const pup_error *err);

/* batch.c: pup_processor_batch; with `chained` (the run loop), a batch that reads ahead a
 * full window may commit behind the next window's batch, and so on for up to a second
 * (batch.c, chain): *handled and *advanced add up the batches that committed. */
int pup_proc_batch(pup_processor *p, int chained, int *handled, long long *advanced, int *waiting,
                   pup_error *err);

/* lease.c */
int pup_proc_lease_sql_init(pup_processor *p);
void pup_proc_lease_sql_free(pup_processor *p);
/* A checkpoint write matched no row (n of the rows held): names why in err (a reset started a new
 * generation: transient, the processor reloads and starts over; else a lost lease or
 * a second writer); returns -1. */
int pup_proc_fenced(pup_processor *p, long long from, int n, pup_error *err);
/* The projection was reset (generation gen): err says so (transient); what is held is
 * dropped, so the next acquire reloads. Returns -1. */
int pup_proc_reset_seen(pup_processor *p, long long gen, pup_error *err);

/* run_loop.c */
int pup_proc_listen(pup_processor *p, pup_error *err);

#endif
