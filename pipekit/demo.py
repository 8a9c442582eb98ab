"""The built-in demo: a card-transaction pipeline over synthetic data.

``pipekit demo`` runs it; nothing outside this module is needed (no network, no files).
The five stages each show one thing pipekit is for::

    TransactionFeed (seeded, endless or --items N)
      -> parse      text line -> Tx                      2 threads
      -> enrich     merchant and user look-ups, 1-3 ms   2 to 16 threads, autoscaled (I/O)
      -> score      pure-Python fraud score, ~0.3 ms     2 processes (CPU)
      -> aggregate  running totals per user, in order    keyed by user
      -> store      flaky writes: 2 % transient IOError  retried; ~0.1 % rejected for
                    good (unknown merchant)              good -> dead letters

Functions a process worker runs (:func:`score`) and the data it receives (:class:`Tx`)
live at module level, so they pickle by name; importing this module is cheap, since
process workers import it too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pipekit

__all__ = [
    "DEMO_PIPELINE",
    "Demo",
    "IntegrityError",
    "TransactionFeed",
    "Tx",
    "build",
    "home_country",
    "parse",
    "score",
    "user_of",
]

log = logging.getLogger("pipekit.demo")

DEMO_PIPELINE = "transactions"
"""The demo pipeline's name (its metrics label and profile folder)."""

_USERS = 5000
_MERCHANTS = 400
_COUNTRIES = ("US", "US", "US", "GB", "DE", "FR", "NL", "CA", "BR", "IN", "JP", "NG")
_CATEGORIES = ("grocery", "fuel", "travel", "electronics", "restaurants", "gaming",
               "jewelry", "pharmacy")
_UNKNOWN_MERCHANT = "m9999"  # not in the merchant table: the store rejects it for good
_UNKNOWN_EVERY = 1000  # about one transaction in this many names it
_TRANSIENT_RATE = 0.02
_ABROAD_RATE = 0.1
_WEIGHTS = tuple(((i * 2654435761) % 1000) / 1000.0 - 0.5 for i in range(256))


class IntegrityError(Exception):
    """The demo store rejected a transaction for good (not retried: a dead letter)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tx:
    """One card transaction, filled in stage by stage.

    Attributes:
        tx_id: the transaction number.
        user_id: the card holder.
        amount: the amount in ``currency``.
        currency: an ISO currency code.
        merchant: the merchant id.
        country: where the card was used.
        ts: when (seconds since the epoch).
        category: the merchant's category (set by ``enrich``).
        home_country: the card holder's country (set by ``enrich``).
        risk: the fraud score from 0 to 1 (set by ``score``).
        user_total: the holder's running total so far (set by ``aggregate``).
        user_count: the holder's transactions so far (set by ``aggregate``).
    """

    tx_id: int
    user_id: str
    amount: float
    currency: str
    merchant: str
    country: str
    ts: float
    category: str = ""
    home_country: str = ""
    risk: float = 0.0
    user_total: float = 0.0
    user_count: int = 0


class TransactionFeed:
    """Synthetic transactions as CSV lines, from a seeded generator.

    ``len()`` works when ``count`` is given (so ``pipekit demo --items N`` shows a
    progress bar); without it the feed never ends.

    Args:
        seed: the random seed; the same seed gives the same lines.
        count: how many lines, or ``None`` for an endless feed.

    Raises:
        ConfigError: ``count`` is below 1.
    """

    def __init__(self, *, seed: int = 7, count: int | None = None) -> None:
        if count is not None and (isinstance(count, bool) or count < 1):
            raise pipekit.ConfigError(f"count must be >= 1 or None for an endless feed "
                                      f"(got {count!r})")
        self.seed = seed
        self.count = count

    def __repr__(self) -> str:
        return f"TransactionFeed(seed={self.seed}, count={self.count})"

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("an endless TransactionFeed has no length")
        return self.count

    def __iter__(self) -> Iterator[str]:
        rng = random.Random(self.seed)
        start = 1_764_000_000.0
        n = 0
        while self.count is None or n < self.count:
            n += 1
            user = rng.randrange(_USERS)
            merchant = (_UNKNOWN_MERCHANT if rng.randrange(_UNKNOWN_EVERY) == 0
                        else f"m{rng.randrange(_MERCHANTS):04d}")
            amount = round(min(rng.lognormvariate(3.4, 1.1), 25_000.0), 2)
            abroad = rng.random() < _ABROAD_RATE
            country = (_COUNTRIES[rng.randrange(len(_COUNTRIES))] if abroad
                       else home_country(user))
            yield f"{n},u{user:05d},{amount:.2f},USD,{merchant},{country},{start + n * 0.01:.2f}"


def home_country(user: int) -> str:
    """The home country of user number ``user`` (the same in the feed and the look-ups)."""
    return _COUNTRIES[(user * 7919) % len(_COUNTRIES)]


def parse(line: str) -> Tx:
    """Turn one CSV line of the feed into a :class:`Tx`.

    Raises:
        ValueError: the line does not have the seven fields of the feed.
    """
    tx_id, user, amount, currency, merchant, country, ts = line.split(",")
    return Tx(tx_id=int(tx_id), user_id=user, amount=float(amount), currency=currency,
              merchant=merchant, country=country, ts=float(ts))


def score(tx: Tx) -> Tx:
    """Score a transaction's fraud risk: a small pure-Python model, about 0.2-0.5 ms.

    CPU-bound on purpose, so the stage runs on processes. Module level, so it pickles.
    """
    h = (tx.tx_id * 2654435761) & 0x7FFFFFFF
    rounds = 2400 + min(int(tx.amount), 3000)
    total = 0.0
    for _ in range(rounds):
        h = (h * 1103515245 + 12345) & 0x7FFFFFFF
        total += _WEIGHTS[h & 255]
    signal = total / rounds * 8.0 + min(tx.amount / 250.0, 2.0)
    if tx.home_country and tx.country != tx.home_country:
        signal += 1.5
    if tx.category in ("jewelry", "electronics", "gaming"):
        signal += 1.0
    risk = 1.0 / (1.0 + math.exp(3.0 * (3.0 - signal)))
    return dataclasses.replace(tx, risk=round(risk, 4))


def user_of(tx: Tx) -> str:
    """The key of the ``aggregate`` stage: a user's transactions run one at a time."""
    return tx.user_id


class Demo:
    """The demo's stateful parts: look-up tables, per-user ledger and the flaky store.

    Args:
        seed: seeds the look-up tables and the simulated latencies and failures.
    """

    def __init__(self, *, seed: int = 7) -> None:
        rng = random.Random(seed ^ 0x5EED)
        self.merchants = {f"m{i:04d}": _CATEGORIES[rng.randrange(len(_CATEGORIES))]
                          for i in range(_MERCHANTS)}
        self.home = {f"u{i:05d}": home_country(i) for i in range(_USERS)}
        self._rng = random.Random(seed)  # shared by worker threads; each call is atomic
        self._totals: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self.rows = 0
        self.flagged = 0
        self.transient_errors = 0

    def __repr__(self) -> str:
        return f"Demo(rows={self.rows}, flagged={self.flagged})"

    def enrich(self, tx: Tx) -> Tx:
        """Look up the merchant's category and the user's home country (1-3 ms of I/O)."""
        time.sleep(self._rng.uniform(0.001, 0.003))
        return dataclasses.replace(tx, category=self.merchants.get(tx.merchant, "unknown"),
                                   home_country=self.home.get(tx.user_id, ""))

    def aggregate(self, tx: Tx) -> Tx:
        """Add the transaction to its user's running total (keyed: in order per user)."""
        total, count = self._totals.get(tx.user_id, (0.0, 0))
        total, count = round(total + tx.amount, 2), count + 1
        self._totals[tx.user_id] = (total, count)
        return dataclasses.replace(tx, user_total=total, user_count=count)

    def store(self, tx: Tx) -> Tx:
        """Write the transaction; flaky like a real database.

        Raises:
            ConnectionResetError: about 2 % of calls (an ``IOError``: retried).
            IntegrityError: the merchant is unknown (not retried: a dead letter).
        """
        if self._rng.random() < _TRANSIENT_RATE:
            with self._lock:
                self.transient_errors += 1
            raise ConnectionResetError("connection to the store was reset")
        if tx.category == "unknown":
            raise IntegrityError(f"transaction {tx.tx_id} names merchant {tx.merchant!r}, "
                                 f"which is not in the merchants table")
        with self._lock:
            self.rows += 1
            self.flagged += tx.risk >= 0.9
        return tx

    def close(self) -> None:
        """The store's ``on_shutdown`` hook: report what was written."""
        log.info("store closed: %d rows written, %d flagged as risky, %d transient errors",
                 self.rows, self.flagged, self.transient_errors)


def build(config: pipekit.Config | None = None, *, seed: int = 7, items: int | None = None,
          **settings: Any) -> tuple[pipekit.Pipeline, Demo]:
    """Build the demo pipeline with its synthetic source.

    Args:
        config: the run's settings (``pipekit.Config.load()`` when None).
        seed: seeds the feed, the look-up tables, latencies and failures.
        items: transactions to generate, or ``None`` for an endless feed.
        **settings: overrides of individual settings.

    Returns:
        The pipeline and the :class:`Demo` holding its state (rows written...).

    Raises:
        ConfigError: a bad setting or ``items`` below 1.
    """
    feed = TransactionFeed(seed=seed, count=items)
    demo = Demo(seed=seed)
    pipe = pipekit.Pipeline(DEMO_PIPELINE, config=config, **settings)
    pipe.add_stage("parse", parse, workers=2)
    pipe.add_stage("enrich", demo.enrich, workers=(2, 16), batch_size=16)
    pipe.add_stage("score", score, executor="process", workers=2, batch_size=64)
    pipe.add_stage("aggregate", demo.aggregate, workers=2, key=user_of)
    pipe.add_stage("store", demo.store, workers=2, on_shutdown=demo.close,
                   retry=pipekit.Retry(attempts=3, backoff=0.01, on=(IOError,)))
    pipe.source(feed)
    return pipe, demo
