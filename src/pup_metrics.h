/*
 * pup_metrics.h -- an HTTP endpoint for operators: Prometheus text exposition on
 * /metrics and a health check on /healthz, served by libmicrohttpd on its own thread.
 *
 * The server never touches processor state: it calls the source's render and health
 * functions, which copy numbers the workers publish (atomics, or a mutex held only to
 * copy), so a scrape never stalls a batch.
 */
#ifndef PUP_METRICS_H
#define PUP_METRICS_H

#include "pup_db.h"

/* A growing text buffer; failed is set (and the text dropped) when memory ran out. */
typedef struct pup_metrics_buf {
    char *p;
    size_t len, cap;
    int failed;
} pup_metrics_buf;

/* Appends printf-style text. */
void pup_metrics_printf(pup_metrics_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Appends the "# HELP" and "# TYPE" lines of a metric family (type: counter, gauge...). */
void pup_metrics_family(pup_metrics_buf *b, const char *name, const char *type, const char *help);

/* Appends `name="value"` with the value escaped as the text format asks (backslash,
 * double quote and newline), preceded by a comma unless first. */
void pup_metrics_label(pup_metrics_buf *b, int first, const char *name, const char *value);

/* What the server shows. Both functions run on the server thread. */
typedef struct pup_metrics_source {
    void *ud;
    void (*render)(void *ud, pup_metrics_buf *b); /* the /metrics text */
    int (*health)(void *ud, pup_metrics_buf *b);  /* 1: healthy; 0: b holds the reasons */
} pup_metrics_source;

typedef struct pup_metrics pup_metrics;

/* Parses HOST:PORT ("[::1]:9464", ":9464" for every address, port 0 for any free one)
 * and binds a listening socket, so a bad host or a port in use fails here, before
 * anything runs. Nothing is served until pup_metrics_start. */
pup_metrics *pup_metrics_bind(const char *addr, pup_error *err);

/* "HOST:PORT" as bound (the port chosen when 0 was asked). */
const char *pup_metrics_address(const pup_metrics *m);

/* Serves src from a thread of the server's own (it inherits the caller's signal mask).
 * src must stay valid until pup_metrics_free. */
int pup_metrics_start(pup_metrics *m, const pup_metrics_source *src, pup_error *err);

/* Stops serving (waits for a request being answered) and closes the socket. NULL is fine. */
void pup_metrics_free(pup_metrics *m);

#endif
