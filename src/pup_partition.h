/*
 * pup_partition.h -- which partition an aggregate belongs to (partition.c): FNV-1a 32-bit
 * over the id's bytes, modulo the partition count. Identical to the Go library, so mixed
 * fleets agree. The appender stores the hash with each event; processors compute it.
 */
#ifndef PUP_PARTITION_H
#define PUP_PARTITION_H

#include <stddef.h>
#include <stdint.h>

/* FNV-1a 32-bit hash of len bytes. */
uint32_t pup_fnv1a32(const char *p, size_t len);
/* The partition of an aggregate id: FNV-1a 32 mod total (0 when total <= 1). */
int pup_partition_of(const char *id, size_t len, int total);

#endif
