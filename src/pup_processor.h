/*
 * pup_processor.h -- projections run in transactional batches (the partition function is
 * in pup_partition.h). The processor is split by concern: processor.c (the object), batch.c
 * (one batch), gap.c (the gap rule), lease.c (locks and leases), run_loop.c (the loop).
 *
 * One batch is one transaction: read the checkpoint, the snapshot and up to batch_size
 * events after it in one statement; hand this partition's events to the handler
 * (whose writes are pipelined); store the new checkpoint; commit. The log is read by
 * the gap rule of docs/ordering.md: the batch stops at a hole in the positions until
 * a snapshot proves no transaction can still fill it.
 */
#ifndef PUP_PROCESSOR_H
#define PUP_PROCESSOR_H

#include "pup_db.h"
#include "pup_partition.h"
#include "pup_store.h"

/* What a projection is, as far as the processor cares. Strings are copied. */
typedef struct pup_projection_cfg {
    const char *name;
    const char *const *aggregate_types; /* NULL or n_aggregate_types strings */
    int n_aggregate_types;
    const char *const *event_types;
    int n_event_types;
    int partition_key, total_partitions;
    int batch_size;
    int poll_interval_ms; /* fallback poll when no notification arrives */
    /* Worker group: partitions are shared among live workers by leases in the checkpoint
     * rows instead of being given (partition_key is then unused; total_partitions is the
     * count used when the group is first created). */
    int group;
    int lease_ttl_ms; /* a worker that stops heartbeating loses its leases after this */
    /* > 0: each SQL statement a handler sends is cancelled after this (statement_timeout),
     * so a handler blocked in the database fails like one stuck in Lua code. The batch read
     * and the checkpoint write are not limited. In a group, at most lease_ttl_ms / 2. */
    int statement_timeout_ms;
    /* What a handler failure on an event does (docs/operations.md, "Poison events"): stop
     * the projection (the default), dead-letter the event at once (skip), or try it
     * max_attempts times, waiting retry_backoff_ms, doubled each time up to 60 s (or
     * retry_backoff_ms if larger), before dead-lettering it (retry). Transient database
     * failures are not handler failures: they are always retried. */
    int on_error;
    int max_attempts;
    int retry_backoff_ms;
    /* The handlers act outside the database (a reactor): an event's handler never runs
     * before the batch before it has committed, as it may when a catch-up commits behind
     * its next batch (docs/reliability.md). */
    int side_effects;
} pup_projection_cfg;

enum { PUP_ON_ERROR_STOP = 0, PUP_ON_ERROR_SKIP, PUP_ON_ERROR_RETRY };

/* The handler side, implemented by the Lua binding. Each returns 0, or -1 with err.
 * handle() runs inside the batch transaction, with pipelining on. */
typedef struct pup_handler {
    void *ud;
    int (*setup)(void *ud, pup_conn *c, pup_error *err);           /* may be NULL */
    int (*handle)(void *ud, pup_conn *c, const pup_event *ev, pup_error *err);
    /* May be NULL. When set, handle is not called: this gets the batch's events that pass
     * the gap rule and are ours, in order, at once (handle_batch), before the checkpoint.
     * A failure fails the whole batch; *pos may name the event it belongs to (else 0). */
    int (*handle_batch)(void *ud, pup_conn *c, const pup_event *evs, int n, long long *pos,
                        pup_error *err);
} pup_handler;

typedef struct pup_processor pup_processor;

/* Creates a processor over conn (borrowed: it must outlive the processor). */
pup_processor *pup_processor_new(const pup_store *store, pup_conn *conn,
                                 const pup_projection_cfg *cfg, const pup_handler *h,
                                 pup_error *err);
void pup_processor_free(pup_processor *p);

/* Takes the partitions this processor may process: the given partition's lock (one live
 * processor per partition), or in a group, heartbeats and leases on a fair share.
 * *acquired is 0 when it holds none: it is a standby and should try again later. The
 * projection has one live layout (lease.c): another one fails with layout_conflict while
 * any of its processors is alive, else it is taken over. */
int pup_processor_acquire(pup_processor *p, int *acquired, pup_error *err);

/* Sets a projection's group partition count (`pupsourcing repartition`), in its own
 * transaction on c (which must be idle): running --group workers switch at their next
 * heartbeat and honour the old layout's checkpoints (lease.c). *previous: the count
 * before (0: a new group; = total: unchanged). Fails with invalid_argument while a
 * repartition still settles, and with layout_conflict when the projection runs as static
 * partitions that are alive (a static layout with none alive becomes the group). */
int pup_group_repartition(const pup_store *s, pup_conn *c, const char *projection, int total,
                          int *previous, pup_error *err);

/* A group worker leaving: hands its leases over at once. Best effort. */
void pup_processor_release(pup_processor *p);

/* Runs one batch. *handled: events given to the handler; *advanced: positions the
 * checkpoint moved; *waiting: the batch stopped at a hole that may still fill.
 * A handler failure on an event rolls the batch back. Under on_error "stop" that is
 * all: the failure is returned. Under "skip" and "retry" the batch is redone up to the
 * event before, then either the failure is returned (retry with attempts left: the
 * checkpoint sits just before the event) or, in the same transaction that moves the
 * checkpoint past it, the event goes to the dead-letter table and 0 is returned (skip,
 * or retry with the attempts used up).
 * A group worker's batch stops after a third of the lease TTL and commits what it
 * handled. A handler that ends the batch transaction (ROLLBACK, COMMIT) fails the batch.
 * Transient failures come back as errors too (pup_error_is_transient). */
int pup_processor_batch(pup_processor *p, int *handled, long long *advanced, int *waiting,
                        pup_error *err);

/* One log record of pup_processor_run: what happened (event), the line text logs show
 * (msg) and the fields a structured log adds. Events: "start", "layout" (a group's
 * partition count changed), "lease_gained", "lease_lost", "standby", "retry" (err,
 * retry_in_ms), "reconnected", "hole" (waited on longer than PUP_HOLE_LOG_SECONDS),
 * "hole_passed", "stop" (reason, err when it failed). Lifecycle records (start, layout,
 * a first lease, hole, stop) are new lines a caller may leave out; the others are the
 * lines pup_processor_run always logged. */
#define PUP_HOLE_LOG_SECONDS 5
typedef struct pup_log_rec {
    const char *level; /* "info", "warning", "error" */
    const char *event;
    const char *msg;
    int lifecycle;
    const char *projection;
    int group;          /* a group worker: partition is meaningless, worker and held tell */
    int partition, total_partitions;
    const char *worker; /* owner id (host/pid/random) */
    int held;
    long long position; /* the checkpoint */
    const pup_error *err;           /* retry, stop after a failure; else NULL */
    int retry_in_ms;                /* retry */
    long long hole;                 /* hole, hole_passed: its first position */
    double hole_since;              /* hole, hole_passed: Unix seconds */
    const char *reason;             /* stop */
} pup_log_rec;

/* Runs batches until stopped: reads stop_fd (readable = stop) between batches and
 * while idle waits for a NOTIFY or the poll interval. Retries transient failures with
 * capped backoff (reconnecting in place), takes over as standby when needed. With
 * once set, returns when the checkpoint reaches the head seen at start. */
typedef struct pup_run_opts {
    int stop_fd;  /* -1: none */
    int once;
    void (*progress)(void *ud, const pup_processor *p); /* after each batch; may be NULL */
    void (*log)(void *ud, const char *line);            /* may be NULL: stderr */
    void (*record)(void *ud, const pup_log_rec *rec);   /* instead of log when set */
    void *ud;
} pup_run_opts;
int pup_processor_run(pup_processor *p, const pup_run_opts *o, pup_error *err);

/* Upper bounds (seconds) of the batch duration histogram's buckets; one more bucket
 * counts the batches above the last. */
#define PUP_BATCH_BUCKET_BOUNDS {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}
#define PUP_BATCH_BUCKETS 11

/* Counters for progress and reports. */
typedef struct pup_processor_stats {
    long long handled;   /* events handled since creation */
    long long position;  /* checkpoint */
    long long head;      /* log head seen by the last batch */
    /* The last position drawn (the sequence) as the last batch saw it: above head, appends
     * are in flight, and one may have left its wake-up to another's (docs/ordering.md,
     * "Wake-ups"): read again soon. */
    long long drawn;
    long long waiting_position; /* hole waited at, 0 if none */
    int standby;
    int held;            /* partitions held */
    long long retries;   /* transient failures retried by pup_processor_run */
    long long handler_errors; /* handler failures of batches (those skipped or retried too) */
    long long dead_letters;   /* events this processor gave up on (on_error) and dead-lettered */
    /* created_at (Unix ms) of the first event after the checkpoint, as the last batch saw
     * it (the next one in its window, else its last while the head is beyond); 0 when the
     * batch reached the head. The lag in seconds is now minus this. */
    long long oldest_pending_ms;
    /* Committed batches that moved the checkpoint: how many took at most bound i of
     * PUP_BATCH_BUCKET_BOUNDS (each counted in its own bucket only; the last is above
     * every bound), and their total duration in microseconds. */
    long long batch_buckets[PUP_BATCH_BUCKETS + 1];
    long long batch_us;
    long long batch_started_ms; /* Unix ms when the batch in progress began; 0 between batches */
    int reader_session; /* 1 while a catch-up holds its read-ahead session (a second connection) */
} pup_processor_stats;
void pup_processor_stats_get(const pup_processor *p, pup_processor_stats *s);
const pup_projection_cfg *pup_processor_cfg(const pup_processor *p);

#endif
