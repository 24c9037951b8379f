"""Which chains keep their head reconstruction in memory: an LRU bounded in bytes.

A head (``Chain.head``) is the reference the chain's next delta is encoded against and what
makes "restore latest" a copy instead of a decode. Without a bound every (run, rank) ever
saved keeps one until the daemon restarts. The engine calls ``touch`` whenever a chain's
head may have changed or was used (a save finished, a delete, a restore from the head);
``touch`` records the head's size, makes the chain the most recently used and evicts the
least recently used heads until the total is within ``max_bytes`` (0: no bound). Eviction
is ``Chain.invalidate``: the chain's next save rebuilds the head from storage
(``SavePipeline.ensure_head``), and restores read storage meanwhile. A chain that is busy
(a save reserved, queued or in the pipeline, or a delete holding its lock) is never
evicted, so a head in use stays; it is looked at again on the next ``touch``.

Used only from the event loop's thread.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from ckptd.daemon.engine.chain import Chain


@dataclass(frozen=True)
class Eviction:
    """A head dropped from memory: its chain, step and size."""

    run: str
    rank: int
    step: int
    nbytes: int


class ResidentHeads:
    """Least recently used first: the chains holding a head, with the bytes each holds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._sizes: collections.OrderedDict[Chain, int] = collections.OrderedDict()
        self._total = 0

    @property
    def resident_bytes(self) -> int:
        return self._total

    def touch(self, chain: Chain) -> list[Eviction]:
        """Records ``chain``'s head (none: forgets it) as the most recently used, then
        evicts idle chains' heads, oldest first, while over the bound; returns them."""
        self._total -= self._sizes.pop(chain, 0)
        head = chain.head
        if head is not None:
            self._sizes[chain] = head.nbytes
            self._total += head.nbytes
        return self._evict()

    def _evict(self) -> list[Eviction]:
        evicted: list[Eviction] = []
        if not self.max_bytes:
            return evicted
        for chain in list(self._sizes):
            if self._total <= self.max_bytes:
                break
            if _busy(chain):
                continue
            head = chain.head
            nbytes = self._sizes.pop(chain)
            self._total -= nbytes
            if head is not None:
                chain.invalidate(head.step)
                evicted.append(Eviction(chain.run, chain.rank, head.step, nbytes))
        return evicted


def _busy(chain: Chain) -> bool:
    return bool(chain.reserved or chain.queued or chain.lock.locked())
