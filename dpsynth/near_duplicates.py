"""Near-duplicate texts: MinHash signatures of word 3-shingles and locality-sensitive hashing (datasketch), then the
connected clusters. Exact dedupe keeps "the same story with a few words changed"; this finds it, so that the
privacy unit and the train/test split are not fooled by copies (Broder 1997; Leskovec et al., Mining of Massive
Datasets, ch. 3)."""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")
NUM_PERM = 64
SHINGLE = 3


def shingles(text: str, k: int = SHINGLE) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < k:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)}


def clusters(texts: list[str], threshold: float = 0.7, seed: int = 0) -> list[list[int]]:
    """Groups (of 2 or more text indices, first occurrence first) whose texts are near-duplicates: connected by
    pairs whose estimated Jaccard similarity of 3-shingles is at least `threshold` (LSH candidates, each checked
    on the MinHash estimate). Cached by content under the dpsynth cache: a dataset is hashed once."""
    import hashlib
    import json

    from dpsynth.io import atomic_write_text
    from dpsynth.models import cache_dir

    key = hashlib.sha256(json.dumps([threshold, seed, NUM_PERM, SHINGLE, texts]).encode()).hexdigest()[:32]
    path = cache_dir() / "near-duplicates" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    found = _clusters(texts, threshold, seed)
    atomic_write_text(path, json.dumps(found))
    return found


def _clusters(texts: list[str], threshold: float, seed: int) -> list[list[int]]:
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    sigs: list[LeanMinHash | None] = []
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, text in enumerate(texts):
        sh = shingles(text)
        if not sh:
            sigs.append(None)
            continue
        m = MinHash(num_perm=NUM_PERM, seed=seed)
        m.update_batch(list(sh))
        sig = LeanMinHash(m)
        sigs.append(sig)
        for j in lsh.query(sig):
            if sig.jaccard(sigs[j]) >= threshold:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        lsh.insert(i, sig)
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def estimated_jaccard(a: str, b: str, seed: int = 0) -> float:
    from datasketch import MinHash

    sigs = []
    for text in (a, b):
        m = MinHash(num_perm=NUM_PERM, seed=seed)
        m.update_batch(list(shingles(text)) or [b""])
        sigs.append(m)
    return float(sigs[0].jaccard(sigs[1]))


MIN_COLLISION = 0.5
"""The least probability with which a pair of texts at exactly the configured similarity gets one near-duplicate key."""


def band_rows(threshold: float) -> int:
    """Rows r of the single LSH band a record's near-duplicate key is made of (see `band_key`).

    Each MinHash row of two texts agrees with probability s, their Jaccard similarity of shingles, independently of
    the other rows, so one band of r rows collides with probability P(s) = s^r. (The usual b bands of r rows,
    P = 1 - (1 - s^r)^b, link a pair if ANY band agrees; that is a graph, and its connected clusters are what let one
    added text fuse several units. One key per record, computed from that record alone, is a partition: one band.)
    No partition that depends on each record alone catches every near pair; r = 1 catches the most, P(s) = s. We
    take the largest r with threshold^r >= MIN_COLLISION (r >= 1): at the default 0.7, r = 1 (P = 0.7 at the
    threshold, 0.9 at s = 0.9, 0.3 at s = 0.3); at 0.9, r = 6 (P = 0.53 at the threshold, 0.02 at s = 0.5), so a
    stricter threshold also merges fewer loosely similar texts.
    """
    import math

    if threshold >= 1.0:
        return NUM_PERM
    return max(1, min(NUM_PERM, math.floor(math.log(MIN_COLLISION) / math.log(threshold))))


def band_key(text: str, rows: int, seed: int = 0) -> bytes | None:
    """The first `rows` MinHash values of the text's shingles, as bytes: its near-duplicate key, a function of this
    one text (None for a text without words). Two texts get equal keys with probability s^rows (`band_rows`)."""
    from datasketch import MinHash

    sh = shingles(text)
    if not sh:
        return None
    m = MinHash(num_perm=NUM_PERM, seed=seed)
    m.update_batch(list(sh))
    return m.hashvalues[:rows].astype("<u8").tobytes()
