"""A bounded channel that moves items in chunks.

Each stage reads from one :class:`Channel`. Producers put single items
(``put``/``put_nowait``) or whole lists (``put_many``, what a finished micro-batch
does); the stage's dispatcher takes up to ``n`` items at once with ``get_batch``.
Items are stored as chunks (the lists producers handed in), so moving a batch of a
hundred items costs one lock round trip and a list slice, not a hundred.

Capacity is counted in items. A full channel blocks ``put`` (backpressure) and makes
``put_nowait`` raise :class:`ChannelFull`; nothing is ever buffered beyond capacity,
except that one ``put_many`` larger than the free space waits until the whole chunk
fits or, when the chunk is larger than the capacity, until the channel is empty.

Each chunk may carry a parallel list of per-item contexts (trace contexts) and of
attempt counts; both are ``None`` in the common case and cost nothing then.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["Channel", "ChannelClosed", "ChannelFull", "ChannelStats", "Chunk"]


class ChannelFull(Exception):
    """``put_nowait`` found no room, or ``put`` timed out."""


class ChannelClosed(Exception):
    """The channel is closed for puts."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelStats:
    """A snapshot of a channel (trio's ``statistics()`` idea).

    Attributes:
        depth: items waiting.
        capacity: the most items it holds.
        peak: the largest depth seen.
        waiting_producers: threads blocked in ``put``.
        waiting_consumers: threads blocked in ``get_batch``.
        closed: whether puts are refused.
        put_total: items ever put.
    """

    depth: int
    capacity: int
    peak: int
    waiting_producers: int
    waiting_consumers: int
    closed: bool
    put_total: int


class Chunk:
    """Items that travel together, with optional per-item contexts and attempt counts."""

    __slots__ = ("attempts", "ctxs", "enqueued", "items")

    def __init__(
        self,
        items: list[Any],
        ctxs: list[Any] | None = None,
        attempts: list[int] | None = None,
        enqueued: float = 0.0,
    ) -> None:
        self.items = items
        self.ctxs = ctxs
        self.attempts = attempts
        self.enqueued = enqueued

    def __len__(self) -> int:
        return len(self.items)

    def split(self, n: int) -> tuple[Chunk, Chunk]:
        """Return the first ``n`` items and the rest as two chunks."""
        c, a = self.ctxs, self.attempts
        head = Chunk(self.items[:n], None if c is None else c[:n],
                     None if a is None else a[:n], self.enqueued)
        tail = Chunk(self.items[n:], None if c is None else c[n:],
                     None if a is None else a[n:], self.enqueued)
        return head, tail

    @staticmethod
    def join(chunks: list[Chunk]) -> Chunk:
        """Concatenate chunks into one, keeping contexts and attempts aligned."""
        if len(chunks) == 1:
            return chunks[0]
        items: list[Any] = []
        for ch in chunks:
            items.extend(ch.items)
        ctxs: list[Any] | None = None
        attempts: list[int] | None = None
        if any(ch.ctxs is not None for ch in chunks):
            ctxs = []
            for ch in chunks:
                ctxs.extend(ch.ctxs if ch.ctxs is not None else [None] * len(ch.items))
        if any(ch.attempts is not None for ch in chunks):
            attempts = []
            for ch in chunks:
                attempts.extend(ch.attempts if ch.attempts is not None else [0] * len(ch.items))
        return Chunk(items, ctxs, attempts, chunks[0].enqueued)


class Channel:
    """A bounded, closable, thread-safe channel of items stored as chunks.

    Args:
        capacity: the most items the channel holds (>= 1).
        clock: a monotonic clock, injectable for tests.
    """

    def __init__(self, capacity: int, *, clock: Any = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 (got {capacity!r})")
        self.capacity = capacity
        self._clock = clock
        self._chunks: deque[Chunk] = deque()
        self._depth = 0
        self._peak = 0
        self._put_total = 0
        self._closed = False
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._not_empty = threading.Condition(self._lock)
        self._waiting_producers = 0
        self._waiting_consumers = 0
        # Extra waiters to wake when items arrive (a dispatcher that also waits on
        # completions registers its own condition here).
        self._listener: threading.Event | None = None

    # -- producers ---------------------------------------------------------------

    def put(self, item: Any, ctx: Any = None, *, timeout: float | None = None) -> None:
        """Put one item, blocking while the channel is full.

        Raises:
            ChannelFull: ``timeout`` passed with no room.
            ChannelClosed: the channel was closed before the item fit.
        """
        self.put_chunk(Chunk([item], None if ctx is None else [ctx]), timeout=timeout)

    def put_nowait(self, item: Any, ctx: Any = None) -> None:
        """Put one item or raise :class:`ChannelFull` at once."""
        with self._lock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            if self._depth >= self.capacity:
                raise ChannelFull("channel is full")
            self._append(Chunk([item], None if ctx is None else [ctx]))

    def put_chunk(self, chunk: Chunk, *, timeout: float | None = None,
                  force: bool = False) -> None:
        """Put a chunk, blocking until it fits.

        A chunk larger than the free space waits for room for all of it; one larger
        than the capacity waits for an empty channel. ``force`` skips the wait and
        the closed check (used to put back items the stage already owned).

        Raises:
            ChannelFull: ``timeout`` passed with no room.
            ChannelClosed: the channel was closed before the chunk fit.
        """
        n = len(chunk.items)
        if n == 0:
            return
        with self._lock:
            if not force:
                need = min(n, self.capacity)
                if self._closed:
                    raise ChannelClosed("channel is closed")
                if self.capacity - self._depth < need:
                    self._wait_for_room(need, timeout)
            self._append(chunk)

    def _wait_for_room(self, need: int, timeout: float | None) -> None:
        deadline = None if timeout is None else self._clock() + timeout
        self._waiting_producers += 1
        try:
            while self.capacity - self._depth < need:
                if self._closed:
                    raise ChannelClosed("channel is closed")
                if deadline is None:
                    self._not_full.wait()
                else:
                    left = deadline - self._clock()
                    if left <= 0:
                        raise ChannelFull("channel is full")
                    self._not_full.wait(left)
            if self._closed:
                raise ChannelClosed("channel is closed")
        finally:
            self._waiting_producers -= 1

    def _append(self, chunk: Chunk) -> None:
        if not chunk.enqueued:
            chunk.enqueued = self._clock()
        self._chunks.append(chunk)
        n = len(chunk.items)
        self._depth += n
        self._put_total += n
        self._peak = max(self._peak, self._depth)
        if self._waiting_consumers:
            self._not_empty.notify()
        listener = self._listener
        if listener is not None:
            listener.set()

    # -- the consumer ------------------------------------------------------------

    def set_listener(self, event: threading.Event | None) -> None:
        """Set an event that is set whenever items arrive or the channel closes."""
        self._listener = event

    def get_batch(self, n: int) -> Chunk | None:
        """Take up to ``n`` items without waiting; ``None`` when empty (or ``n < 1``)."""
        with self._lock:
            if not self._depth or n < 1:
                return None
            return self._take(n)

    def _take(self, n: int) -> Chunk:
        chunks = self._chunks
        taken: list[Chunk] = []
        got = 0
        while chunks and got < n:
            ch = chunks[0]
            size = len(ch.items)
            if got + size <= n:
                chunks.popleft()
                taken.append(ch)
                got += size
            else:
                head, tail = ch.split(n - got)
                chunks[0] = tail
                taken.append(head)
                got = n
        self._depth -= got
        if self._waiting_producers:
            self._not_full.notify_all()
        return Chunk.join(taken)

    def oldest_enqueued(self) -> float | None:
        """When the oldest waiting chunk arrived, or ``None`` when empty."""
        chunks = self._chunks
        try:
            return chunks[0].enqueued
        except IndexError:
            return None

    def wait(self, timeout: float | None) -> bool:
        """Block until the channel has items or is closed; return whether it has items."""
        with self._lock:
            if not self._depth and not self._closed:
                self._waiting_consumers += 1
                try:
                    self._not_empty.wait(timeout)
                finally:
                    self._waiting_consumers -= 1
            return self._depth > 0

    def wait_empty(self, timeout: float | None) -> bool:
        """Block until the channel is empty (a consumer took everything); True if it is."""
        with self._lock:
            if self._depth:
                self._waiting_producers += 1
                try:
                    self._not_full.wait(timeout)
                finally:
                    self._waiting_producers -= 1
            return self._depth == 0

    def close(self) -> None:
        """Refuse further puts; waiting producers get :class:`ChannelClosed`."""
        with self._lock:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()
            listener = self._listener
        if listener is not None:
            listener.set()

    def drain(self) -> list[Chunk]:
        """Remove and return everything waiting."""
        with self._lock:
            out = list(self._chunks)
            self._chunks.clear()
            self._depth = 0
            self._not_full.notify_all()
            return out

    # -- introspection -----------------------------------------------------------

    @property
    def depth(self) -> int:
        """Items waiting (a racy read, fine for gauges)."""
        return self._depth

    @property
    def closed(self) -> bool:
        """Whether puts are refused."""
        return self._closed

    @property
    def full(self) -> bool:
        """Whether no item fits right now."""
        return self._depth >= self.capacity

    def statistics(self) -> ChannelStats:
        """Return a frozen snapshot of the channel."""
        with self._lock:
            return ChannelStats(
                depth=self._depth,
                capacity=self.capacity,
                peak=self._peak,
                waiting_producers=self._waiting_producers,
                waiting_consumers=self._waiting_consumers,
                closed=self._closed,
                put_total=self._put_total,
            )
