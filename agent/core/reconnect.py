"""Which broker to try next, and when: failover over a list of broker URLs with jittered backoff.

A fleet that loses its broker (a node of a cluster dies, a site's network blinks) must not come
back as one thundering herd: ten thousand devices reconnecting in the same second to the
surviving nodes knock them over in turn. So every wait is drawn at random ("full jitter": uniform
between a small floor and a ceiling), and the ceiling doubles with every full round of brokers
that all failed, up to ``cap``:

* a connection that was up drops: try the **next** broker of the list after at most ``base``
  seconds (a node that just died will not be back in a second; its peers are up);
* an attempt fails: the next broker again, the ceiling growing once every broker of the list has
  been tried in this outage (``base``, ``2·base``, ``4·base`` … ``cap``);
* a connection succeeds: back to the first ceiling.

Each device starts on a broker drawn at random, so a fleet spreads across the nodes from its
first connection on rather than all on the first URL of a shared configuration.

Pure: the random source is given (seeded in tests), no clock, no I/O.
"""

from __future__ import annotations

import random

__all__ = ["Failover"]


class Failover:
    """The broker index to use and the wait before each reconnect, for ``count`` brokers."""

    def __init__(self, count: int, *, base: float = 1.0, cap: float = 30.0, floor: float = 0.1,
                 rng: random.Random | None = None) -> None:
        if count < 1:
            raise ValueError(f"need at least one broker, got {count}")
        if not 0 < floor <= base <= cap:
            raise ValueError(f"need 0 < floor <= base <= cap, got floor={floor}, base={base}, cap={cap}")
        self.count = count
        self.base, self.cap, self.floor = base, cap, floor
        self._rng = rng or random.Random()
        self.index = self._rng.randrange(count)
        self.failures = 0  # attempts failed (or connections lost) since the last success

    def connected(self) -> None:
        """The connection to broker ``index`` is up."""
        self.failures = 0

    def ceiling(self) -> float:
        """The longest wait before the next attempt: ``base``, doubled per full failed round."""
        rounds = max(self.failures - 1, 0) // self.count
        return min(self.cap, self.base * 2.0 ** min(rounds, 32))

    def failed(self) -> tuple[int, float]:
        """The connection (or the attempt) to broker ``index`` failed: the broker to try next and
        the seconds to wait before trying it."""
        self.failures += 1
        self.index = (self.index + 1) % self.count
        return self.index, self._rng.uniform(self.floor, self.ceiling())
