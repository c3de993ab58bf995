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
