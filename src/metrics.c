/*
 * metrics.c -- the operator's HTTP endpoint (pup_metrics.h): /metrics in the Prometheus
 * text format 0.0.4, /healthz as 200 "ok" or 503 with the reasons. libmicrohttpd runs
 * the server on its own polling thread; the socket is bound up front by us so that a bad
 * address fails with a message naming it.
 */
#include "pup_metrics.h"

#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct pup_metrics {
    int fd; /* the listening socket until the daemon owns it */
    struct MHD_Daemon *daemon;
    pup_metrics_source src;
    char address[300];
};

void pup_metrics_printf(pup_metrics_buf *b, const char *fmt, ...) {
    if (b->failed) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = 1;
            return;
        }
        if (b->p && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap : 4096;
        while (cap <= b->len + (size_t)n) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

void pup_metrics_family(pup_metrics_buf *b, const char *name, const char *type, const char *help) {
    pup_metrics_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void pup_metrics_label(pup_metrics_buf *b, int first, const char *name, const char *value) {
    pup_metrics_printf(b, "%s%s=\"", first ? "" : ",", name);
    for (const char *s = value; *s; s++) {
        if (*s == '\\') pup_metrics_printf(b, "\\\\");
        else if (*s == '"') pup_metrics_printf(b, "\\\"");
        else if (*s == '\n') pup_metrics_printf(b, "\\n");
        else pup_metrics_printf(b, "%c", *s);
    }
    pup_metrics_printf(b, "\"");
}

static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *type, pup_metrics_buf *b) {
    if (b->failed) {
        free(b->p);
        b->p = NULL;
        b->len = 0;
        status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        type = "text/plain; charset=utf-8";
    }
    struct MHD_Response *r = MHD_create_response_from_buffer_with_free_callback(b->len, b->p, free);
    if (!r) {
        free(b->p);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    enum MHD_Result rc = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return rc;
}

/* GET (or HEAD) /metrics and /healthz; 404 for other paths, 405 for other methods. */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size,
                                  void **con_cls) {
    (void)version, (void)upload_data, (void)upload_size, (void)con_cls;
    const pup_metrics *m = cls;
    pup_metrics_buf b = {0};
    const char *text = "text/plain; charset=utf-8";
    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0) {
        pup_metrics_printf(&b, "only GET and HEAD\n");
        return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, text, &b);
    }
    if (strcmp(url, "/metrics") == 0) {
        m->src.render(m->src.ud, &b);
        return reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", &b);
    }
    if (strcmp(url, "/healthz") == 0) {
        pup_metrics_buf reasons = {0};
        int ok = m->src.health(m->src.ud, &reasons);
        if (ok) {
            free(reasons.p);
            pup_metrics_printf(&b, "ok\n");
            return reply(c, MHD_HTTP_OK, text, &b);
        }
        return reply(c, MHD_HTTP_SERVICE_UNAVAILABLE, text, &reasons);
    }
    pup_metrics_printf(&b, "not found: try /metrics or /healthz\n");
    return reply(c, MHD_HTTP_NOT_FOUND, text, &b);
}

/* Splits "host:port" / "[v6]:port" into host (empty: every address) and port. */
static int split_addr(const char *addr, char *host, size_t hsize, char *port, size_t psize) {
    const char *colon;
    size_t hlen;
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end[1] != ':') return -1;
        colon = end + 1;
        addr++;
        hlen = (size_t)(end - addr);
    } else {
        colon = strrchr(addr, ':');
        if (!colon) return -1;
        hlen = (size_t)(colon - addr);
        if (memchr(addr, ':', hlen)) return -1; /* a bare IPv6 address needs brackets */
    }
    const char *p = colon + 1;
    size_t plen = strlen(p);
    if (hlen >= hsize || plen == 0 || plen >= psize || strspn(p, "0123456789") != plen || atol(p) > 65535)
        return -1;
    memcpy(host, addr, hlen);
    host[hlen] = '\0';
    memcpy(port, p, plen + 1);
    return 0;
}

pup_metrics *pup_metrics_bind(const char *addr, pup_error *err) {
    char host[256], port[8];
    if (split_addr(addr, host, sizeof host, port, sizeof port) < 0) {
        pup_error_set(err, PUP_ERR_INVALID_ARGUMENT,
                      "metrics address \"%.200s\" is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464, :9464; port 0..65535)",
                      addr);
        return NULL;
    }
    struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_NUMERICSERV, .ai_socktype = SOCK_STREAM}, *res;
    int gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (gai != 0) {
        pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "metrics address %.200s: host %s: %s", addr, host,
                      gai_strerror(gai));
        return NULL;
    }
    int fd = -1, why = 0;
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            why = errno;
            continue;
        }
        int on = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
        if (bind(fd, a->ai_addr, a->ai_addrlen) < 0 || listen(fd, 64) < 0) {
            why = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0) {
        pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "metrics address %.200s: cannot listen: %s", addr,
                      strerror(why));
        return NULL;
    }
    pup_metrics *m = calloc(1, sizeof *m);
    if (!m) {
        close(fd);
        pup_error_set(err, PUP_ERR_OUT_OF_MEMORY, "out of memory");
        return NULL;
    }
    m->fd = fd;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char h[NI_MAXHOST], s[NI_MAXSERV];
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
        getnameinfo((struct sockaddr *)&ss, sl, h, sizeof h, s, sizeof s, NI_NUMERICHOST | NI_NUMERICSERV) == 0)
        snprintf(m->address, sizeof m->address, ss.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", h, s);
    else
        snprintf(m->address, sizeof m->address, "%s", addr);
    return m;
}

const char *pup_metrics_address(const pup_metrics *m) { return m->address; }

int pup_metrics_start(pup_metrics *m, const pup_metrics_source *src, pup_error *err) {
    if (m->daemon) return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "the metrics server already runs");
    m->src = *src;
    m->daemon = MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD, 0, NULL, NULL, on_request, m,
                                 MHD_OPTION_LISTEN_SOCKET, (MHD_socket)m->fd, MHD_OPTION_CONNECTION_TIMEOUT,
                                 (unsigned)10, MHD_OPTION_END);
    if (!m->daemon)
        return pup_error_set(err, PUP_ERR_INVALID_ARGUMENT, "cannot start the metrics server on %s", m->address);
    m->fd = -1; /* the daemon closes it when stopped */
    return 0;
}

void pup_metrics_free(pup_metrics *m) {
    if (!m) return;
    if (m->daemon) MHD_stop_daemon(m->daemon);
    if (m->fd >= 0) close(m->fd);
    free(m);
}
