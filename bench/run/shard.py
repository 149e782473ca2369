"""Prompt sharding: ``shard=i/n`` selects the i-th of n contiguous, near-equal blocks (0-based).

Every runner takes the same spelling; the union of the n shards is the whole set, in order, with
no prompt in two shards, so merging shards and sorting by position reproduces a single run.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, spec: "str | Shard | None") -> "Shard":
        if spec is None or spec == "" or isinstance(spec, Shard):
            return spec or cls()
        text = str(spec).strip()
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise ValueError(f"shard={spec!r} is not of the form i/n (e.g. shard=0/3, 0-based)") from None
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"shard={spec!r}: need n >= 1 and 0 <= i < n (0-based index)")
        return cls(i, n)

    @property
    def whole(self) -> bool:
        return self.count == 1

    def bounds(self, n_items: int) -> tuple[int, int]:
        """[start, stop) of this shard over ``n_items`` (the first n_items % count shards get one more)."""
        q, r = divmod(n_items, self.count)
        start = self.index * q + min(self.index, r)
        return start, start + q + (1 if self.index < r else 0)

    def select(self, n_items: int) -> list[int]:
        a, b = self.bounds(n_items)
        return list(range(a, b))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
