/*
 * A C program on libpupsourcing alone (no Lua): appends the events of three orders and
 * runs a projection whose handler is C, counting events per type into a table in the
 * same transaction that moves its checkpoint. Needs DATABASE_URL (else libpq defaults).
 */
#include <pup_processor.h> /* with pup_db.h and pup_store.h; -I<prefix>/include/pupsourcing */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what, const pup_error *err) {
    fprintf(stderr, "%s: %s (%s%s%s)\n", what, err->message, pup_code_name(err->code),
            err->sqlstate[0] ? ", sqlstate " : "", err->sqlstate);
    exit(1);
}

static pup_str str(const char *s) { return (pup_str){s, strlen(s)}; }

/* Appends events of the given types to one order, expecting it at version `expected`
 * (0: a new stream); optimistic concurrency refuses a stale version. */
static void append(const pup_store *store, pup_conn *c, pup_append_buf *buf, const char *order_id,
                   long long expected, const char *const *types, int n) {
    pup_event_in events[4];
    memset(events, 0, sizeof events);
    for (int i = 0; i < n; i++) {
        events[i].event_type = str(types[i]);
        events[i].event_version = 1;
        events[i].payload = str("{\"source\": \"examples/c\"}");
    }
    pup_append_result res;
    pup_error err;
    if (pup_store_append(store, c, buf, "Order", 5, order_id, strlen(order_id), expected, events, n,
                         &res, &err) < 0)
        die("append", &err);
    free(res.positions);
}

/* The projection's state: the parameter arrays its handler reuses for every event. */
typedef struct counter {
    pup_params params;
} counter;

/* Once per run, before the first batch (in a transaction of its own). */
static int counter_setup(void *ud, pup_conn *c, pup_error *err) {
    (void)ud;
    return pup_conn_command(c, "CREATE TABLE IF NOT EXISTS cex_type_counts"
                               " (event_type text PRIMARY KEY, count bigint NOT NULL)", err);
}

/* Once per event, inside the batch transaction: the write is pipelined (queued, its
 * result read at the end of the batch), and it commits with the checkpoint. */
static int counter_handle(void *ud, pup_conn *c, const pup_event *ev, pup_error *err) {
    counter *k = ud;
    const pup_stmt *st = pup_conn_prepare(c,
        "INSERT INTO cex_type_counts (event_type, count) VALUES ($1, 1)"
        " ON CONFLICT (event_type) DO UPDATE SET count = cex_type_counts.count + 1", err);
    if (!st) return -1;
    if (pup_params_reset(&k->params, 1) < 0) return pup_error_set(err, PUP_ERR_HANDLER, "out of memory");
    pup_params_text(&k->params, 0, ev->event_type.p, ev->event_type.len);
    return pup_conn_send(c, st, &k->params, err);
}

int main(void) {
    pup_error err;
    pup_conn *c = pup_conn_open(NULL, &err); /* NULL: DATABASE_URL */
    if (!c) die("connect", &err);

    pup_store store;
    if (pup_store_init(&store, "cex_events", "cex_heads", "cex_checkpoints", &err) < 0 ||
        pup_store_migrate(&store, c, &err) < 0)
        die("migrate", &err);

    /* Three new orders (ids unique to this run): 6 events. */
    pup_append_buf buf = {0};
    char id[3][48];
    for (int i = 0; i < 3; i++)
        snprintf(id[i], sizeof id[i], "order-%ld-%d-%d", (long)time(NULL), (int)getpid(), i + 1);
    append(&store, c, &buf, id[0], 0, (const char *const[]){"OrderPlaced", "OrderPaid"}, 2);
    append(&store, c, &buf, id[1], 0, (const char *const[]){"OrderPlaced"}, 1);
    append(&store, c, &buf, id[2], 0, (const char *const[]){"OrderPlaced", "OrderPaid"}, 2);
    append(&store, c, &buf, id[0], 2, (const char *const[]){"OrderShipped"}, 1);
    pup_append_buf_free(&buf);

    /* The projection: one partition, batches of 2 events so it takes a few. */
    counter k = {0};
    pup_projection_cfg cfg = {.name = "type_counts", .total_partitions = 1, .batch_size = 2};
    pup_handler h = {.ud = &k, .setup = counter_setup, .handle = counter_handle};
    pup_processor *p = pup_processor_new(&store, c, &cfg, &h, &err);
    int acquired = 0;
    if (!p || pup_processor_acquire(p, &acquired, &err) < 0) die("processor", &err);
    if (!acquired) {
        fprintf(stderr, "another processor holds the partition\n");
        return 1;
    }
    long long total = 0;
    for (;;) {
        int handled, waiting;
        long long advanced;
        if (pup_processor_batch(p, &handled, &advanced, &waiting, &err) < 0) die("batch", &err);
        total += handled;
        pup_processor_stats s;
        pup_processor_stats_get(p, &s);
        if (s.position >= s.head) break; /* caught up with the log */
        if (waiting) nanosleep(&(struct timespec){0, 10000000}, NULL); /* a hole may still fill */
    }
    printf("handled %lld events\n", total);
    pup_processor_free(p);
    pup_params_free(&k.params);

    /* The read model, with plain libpq on the same connection. */
    PGresult *r = PQexec(pup_conn_pg(c), "SELECT event_type, count FROM cex_type_counts ORDER BY 1");
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "query: %s", PQerrorMessage(pup_conn_pg(c)));
        return 1;
    }
    for (int i = 0; i < PQntuples(r); i++) printf("%s %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1));
    PQclear(r);
    pup_store_free(&store);
    pup_conn_close(c);
    return 0;
}
