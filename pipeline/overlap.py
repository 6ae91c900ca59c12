"""Sample keys that two sources (or two shards of one) share, estimated at start-up from the shards'
key sketches (``shard_format.key_sketch``), so nothing is read for it; shared keys are evidence, not
proof, so the loader only warns. The estimate: docs/FORMAT.md, "Estimating shared keys".
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

from shard_tools.shard_format import KEY_SKETCH_SIZE
from shard_tools.urls import Shard


@dataclass(frozen=True)
class Overlap:
    """About ``keys`` sample keys shared by sources ``first`` and ``second`` (equal names: within one
    source), in ``pairs`` pairs of shards, the first of them ``example``."""

    first: str
    second: str
    keys: int
    pairs: int
    example: tuple[str, str]

    def message(self) -> str:
        what = (f"source '{self.first}' holds about {self.keys} sample key(s) twice" if self.first == self.second
                else f"sources '{self.first}' and '{self.second}' share about {self.keys} sample key(s)")
        return (f"{what}, in {self.pairs} pair(s) of shards (first: "
                f"{self.example[0]} and {self.example[1]}): if these are the same samples (a copied shard, "
                f"a corpus packed twice) each is trained twice per epoch; list them once")


def shared_keys(a: Shard, b: Shard) -> float:
    """Estimated keys shared by two shards with sketches (docs/FORMAT.md#estimating-shared-keys)."""
    union = sorted(set(a.key_sketch) | set(b.key_sketch))[:KEY_SKETCH_SIZE]
    both = set(a.key_sketch) & set(b.key_sketch)
    jaccard = sum(h in both for h in union) / len(union)
    return jaccard * (a.samples + b.samples) / (1 + jaccard)


def overlaps(sources: list[tuple[str, list[Shard]]]) -> list[Overlap]:
    """Shared keys between the shards of ``(source name, shards)``, summed per pair of sources.
    Only shards whose sketches share a hash are compared; each hash of a packed split is in one of
    its shards, so that is about as many pairs as there are shared hashes."""
    owners: dict[int, list[tuple[str, Shard]]] = defaultdict(list)
    for name, shards in sources:
        for shard in shards:
            for h in shard.key_sketch or ():
                owners[h].append((name, shard))
    pairs: dict[tuple[str, str], tuple[str, Shard, str, Shard]] = {}
    for holders in owners.values():
        for (name_a, a), (name_b, b) in itertools.combinations(holders, 2):
            pairs.setdefault((a.url, b.url), (name_a, a, name_b, b))
    by_sources: dict[tuple[str, str], list[tuple[str, str, float]]] = defaultdict(list)
    for name_a, a, name_b, b in pairs.values():
        by_sources[name_a, name_b].append((a.url, b.url, shared_keys(a, b)))
    return [Overlap(first, second, round(sum(keys for *_, keys in found)), len(found), found[0][:2])
            for (first, second), found in by_sources.items()]
