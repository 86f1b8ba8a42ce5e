#ifndef CONCORD_SHA256_H
#define CONCORD_SHA256_H

#include <stddef.h>
#include <stdint.h>

/// SHA-256 of `length` bytes at `data` into the 32 bytes at `digest`, in one call.
///
/// Uses the processor's SHA extensions where it has them, portable code otherwise. Record
/// hashes are short (a key, or a key and a value of a few hundred bytes): a one-shot call
/// with the state on the stack costs a fraction of a streaming hasher's setup.
void concord_sha256(const void *data, size_t length, uint8_t digest[32]);

/// The same in portable code only, whatever the processor (for tests).
void concord_sha256_portable(const void *data, size_t length, uint8_t digest[32]);

/// Whether `concord_sha256` runs on the processor's SHA extensions.
int concord_sha256_accelerated(void);

#endif
