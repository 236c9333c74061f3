/*
 * test_codes.c -- the error code table of db.c: every code has one stable name and reads
 * back from it (out_of_memory included), unknown names and codes are told apart. No
 * database. Prints TAP; exits non-zero on any failure.
 */
#include <stdio.h>
#include <string.h>

#include "pup_db.h"
#include "tap.h"

static void ok(int cond, const char *what) { tap_ok(cond, what, NULL); }

int main(void) {
    static const char *const expected[] = {
        "ok", "optimistic_concurrency", "no_events", "invalid_event", "database", "connection",
        "not_migrated", "handler", "invalid_projection", "invalid_argument", "out_of_memory",
        "layout_conflict", "duplicate_event"};
    int n = (int)(sizeof expected / sizeof expected[0]);
    ok(n == PUP_ERR_DUPLICATE_EVENT + 1, "every code of the enum is listed here");
    for (int c = 0; c < n; c++) {
        char what[96];
        snprintf(what, sizeof what, "code %d is named %s and reads back", c, expected[c]);
        pup_code back = (pup_code)-1;
        ok(strcmp(pup_code_name((pup_code)c), expected[c]) == 0 &&
               pup_code_from_name(expected[c], &back) == 0 && back == (pup_code)c,
           what);
    }
    pup_code keep = PUP_ERR_HANDLER;
    ok(pup_code_from_name("no_such_code", &keep) == -1 && keep == PUP_ERR_HANDLER,
       "an unknown name is refused and leaves the code alone");
    ok(strcmp(pup_code_name((pup_code)99), "unknown") == 0, "an unknown code is named unknown");
    pup_error e;
    pup_error_set(&e, PUP_ERR_OUT_OF_MEMORY, "out of memory");
    ok(strcmp(pup_code_name(e.code), "out_of_memory") == 0, "out of memory is one code");
    return tap_done();
}
