/*
 * partition.c -- which partition an aggregate belongs to. See pup_partition.h.
 */
#include "pup_partition.h"

uint32_t pup_fnv1a32(const char *p, size_t len) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)p[i];
        h *= 16777619u;
    }
    return h;
}

int pup_partition_of(const char *id, size_t len, int total) {
    return total <= 1 ? 0 : (int)(pup_fnv1a32(id, len) % (uint32_t)total);
}
