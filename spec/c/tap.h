/*
 * tap.h -- the TAP lines the C tests print: one per check, a plan at the end, and the
 * exit status ctest reads. Included once per test program (its counters are the
 * program's own).
 */
#ifndef PUP_TAP_H
#define PUP_TAP_H

#include <stdio.h>

#include "pup_db.h"

static int n_tests, n_failed;

/* Counts a check and prints "ok N - what" or "not ok N - what"; a failed check with an
 * error also prints its code, SQLSTATE and message. */
static inline void tap_ok(int cond, const char *what, const pup_error *err) {
    n_tests++;
    if (cond) {
        printf("ok %d - %s\n", n_tests, what);
    } else {
        n_failed++;
        printf("not ok %d - %s\n", n_tests, what);
        if (err && err->code != PUP_OK)
            printf("#   error: code=%s sqlstate=%s message=%s\n", pup_code_name(err->code), err->sqlstate,
                   err->message);
    }
    fflush(stdout);
}

/* Prints the plan and returns the exit status: 0 when every check passed. */
static inline int tap_done(void) {
    printf("1..%d\n", n_tests);
    return n_failed ? 1 : 0;
}

#endif
