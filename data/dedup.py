"""Duplicate keys of a document, and the rule that removes copies, as The Stack and StarCoder did.

    bands = lsh_bands(0.85)                      # datasketch's LSH bands x rows for that Jaccard threshold
    k = keys(text_bytes, digest, bands)         # uint64: [content key, one key per LSH band]
    exact, near = later_copies(pos, all_keys)    # one global pass over the keys of every document

A document's keys are its content hash and, for near-duplicates, its LSH band keys: MinHash
(datasketch, NUM_PERM permutations) over the hashes of its word 5-grams, cut into b bands of r
values. Two documents whose keys meet are copies. Band keys are candidates, not verified Jaccard:
with 256 permutations at 0.85 (13 bands x 19 rows) a pair of Jaccard 0.85 meets with probability
0.45, 0.9 with 0.85, 0.95 with 0.998; 0.8 with 0.17 and 0.7 with 0.015.

The rule: a document is dropped when an earlier document (by source position, kept or not) shares
one of its keys. It depends only on the documents and their positions, so a streaming run, and N
shards joined by one pass over their keys, drop the same documents. Every kept document is the
first of its keys, so no two kept documents are candidates of each other, across train and val too.
"""
import functools
import hashlib
import re
import zlib

import numpy as np

NGRAM = 5  # word 5-grams, as StarCoder
NUM_PERM = 256  # MinHash permutations, as StarCoder
WORD = re.compile(rb"[A-Za-z0-9_]+")  # words as BigCode's near-dedup split them: whitespace and symbols ignored
_base = {}  # per process: the MinHash whose permutations every document copies


@functools.cache  # datasketch integrates the probabilities: 0.1 s per call
def lsh_bands(threshold):
    """(bands, rows) that datasketch's MinHashLSH picks for this threshold and NUM_PERM."""
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    return lsh.b, lsh.r


def shingles(data):
    """32-bit hashes of a document's distinct word 5-grams (fewer words: one shingle of them all)."""
    words = np.fromiter(map(zlib.crc32, WORD.findall(data)), dtype=np.uint64)
    n = min(NGRAM, len(words))
    if n == 0:  # no words: only exact copies can match
        return np.array([zlib.crc32(data)], dtype=np.uint32)
    h = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for k in range(n):  # a polynomial hash of n consecutive word hashes, folded to 32 bits
        h = h * np.uint64(1_000_003) + words[k:len(words) - n + 1 + k]
    return np.unique((h ^ (h >> np.uint64(32))).astype(np.uint32))


def keys(data, digest, bands):
    """uint64 keys of a document (its UTF-8 bytes and sha256): the content key, then one key per LSH band
    (none when bands is None)."""
    content = int.from_bytes(digest[:8], "little")
    if bands is None:
        return np.array([content], dtype=np.uint64)
    from datasketch import MinHash
    if "minhash" not in _base:
        _base["minhash"] = MinHash(num_perm=NUM_PERM, hashfunc=int)  # shingles are hashed already
    m = _base["minhash"].copy()
    m.update_batch(shingles(data).tolist())  # int() of Python ints (its hashfunc) is cheaper than of numpy's
    b, r = bands
    rows = m.hashvalues[:b * r].reshape(b, r)
    band_keys = [int.from_bytes(hashlib.blake2b(i.to_bytes(2, "little") + row.tobytes(), digest_size=8).digest(),
                                "little") for i, row in enumerate(rows)]
    return np.array([content, *band_keys], dtype=np.uint64)


def later_copies(pos, all_keys):
    """For documents at positions pos (n,) with keys (n, k): boolean masks of the exact copies (an earlier
    document has the same content key) and of the near-copies (not exact; an earlier one shares a band key)."""
    later = np.zeros(all_keys.shape, dtype=bool)
    for j in range(all_keys.shape[1]):
        order = np.lexsort((pos, all_keys[:, j]))  # by key, then by position
        col = all_keys[order, j]
        later[order[1:], j] = col[1:] == col[:-1]
    exact = later[:, 0]
    return exact, later[:, 1:].any(axis=1) & ~exact
