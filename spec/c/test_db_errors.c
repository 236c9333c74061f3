/*
 * test_db_errors.c -- the database layer's error paths (issue 10): one name per code
 * (out_of_memory included), connection errors without the password (malformed strings
 * over 1 KB, short passwords), client_encoding forced to UTF8, COPY refused with the
 * connection left usable. Prints TAP; exits non-zero on any failure. Needs DATABASE_URL.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pup_db.h"
#include "tap.h"


/* Connects to url, which must fail without showing `secret`. */
static void refused_without(const char *url, const char *secret, const char *what) {
    pup_error err;
    memset(&err, 0, sizeof err);
    pup_conn *c = pup_conn_open(url, &err);
    tap_ok(c == NULL && err.code == PUP_ERR_CONNECTION && strstr(err.message, "cannot connect") &&
           !strstr(err.message, secret),
       what, &err);
    pup_conn_close(c);
}

static void test_codes(void) {
    tap_ok(strcmp(pup_code_name(PUP_ERR_OUT_OF_MEMORY), "out_of_memory") == 0, "out_of_memory has its name", NULL);
    int named = 1;
    for (int k = PUP_OK; k <= PUP_ERR_OUT_OF_MEMORY; k++)
        for (int j = PUP_OK; j < k; j++)
            if (strcmp(pup_code_name((pup_code)k), "unknown") == 0 ||
                strcmp(pup_code_name((pup_code)k), pup_code_name((pup_code)j)) == 0)
                named = 0;
    tap_ok(named, "every code has a name of its own", NULL);
}

static void test_secrets(void) {
    char url[2048];
    refused_without("password=Kv7SecretQ host=127.0.0.1 port=1", "Kv7SecretQ", "keyword/value password");
    refused_without("postgresql://u:***@[badhost/x", "***", "password *** in a malformed URL");
    for (int len = 1; len <= 3; len++) {
        const char *pw = len == 1 ? "~" : len == 2 ? "~^" : "~^|";
        snprintf(url, sizeof url, "postgresql://u:%s@[%01200d", pw, 0);
        refused_without(url, pw, "short password in a malformed URL over 1 KB");
        snprintf(url, sizeof url, "password=%s host=%01200d", pw, 0);
        refused_without(url, pw, "short password with a host over 1 KB");
    }
    refused_without("postgresql://u:AtPa@ss9W@127.0.0.1:1/db", "ss9W", "unencoded @ in a URL password");
}

static void test_session(void) {
    pup_error err;
    setenv("PGCLIENTENCODING", "LATIN1", 1);
    pup_conn *c = pup_conn_open(NULL, &err);
    unsetenv("PGCLIENTENCODING");
    tap_ok(c != NULL, "connect", c ? NULL : &err);
    if (!c) return;
    PGresult *r = PQexec(pup_conn_pg(c), "SHOW client_encoding");
    tap_ok(PQresultStatus(r) == PGRES_TUPLES_OK && strcmp(PQgetvalue(r, 0, 0), "UTF8") == 0,
       "client_encoding is UTF8 whatever PGCLIENTENCODING says", NULL);
    PQclear(r);

    tap_ok(pup_conn_prepare(c, "  -- x\n /* y /* z */ */ copy pg_class TO STDOUT", &err) == NULL &&
           err.code == PUP_ERR_INVALID_ARGUMENT && strstr(err.message, "COPY is not supported"),
       "prepare refuses COPY", &err);
    tap_ok(pup_conn_command(c, "COPY (SELECT generate_series(1, 10000)) TO STDOUT", &err) < 0 &&
           err.code == PUP_ERR_INVALID_ARGUMENT && strstr(err.message, "COPY is not supported"),
       "a COPY TO STDOUT command is refused", &err);
    tap_ok(pup_conn_command(c, "CREATE TEMP TABLE t_c_copy (n int); COPY t_c_copy FROM STDIN", &err) < 0 &&
           err.code == PUP_ERR_INVALID_ARGUMENT,
       "a COPY FROM STDIN command is refused", &err);
    tap_ok(pup_conn_command(c, "SELECT 1", &err) == 0, "the connection stays usable", &err);
    tap_ok(pup_conn_prepare(c, "SELECT 1 AS copy", &err) != NULL, "a column named copy is fine", &err);
    pup_conn_close(c);
}

int main(void) {
    test_codes();
    test_secrets();
    test_session();
    return tap_done();
}
