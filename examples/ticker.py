"""An endless service for ``pipekit run``: price ticks in, alerts out, until a signal.

    pipekit run examples.ticker:make_pipeline --ops-port 8080
    curl -s localhost:8080/readyz; curl -s localhost:8080/metrics | grep pipekit_stage
    kill -TERM <pid>                         # drains, prints the summary, exits 143

The target is a factory: ``pipekit`` calls it with no arguments, after layering its
flags over ``pipekit.toml`` and ``PIPEKIT_*``, so the stages' defaults see them.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pipekit

log = logging.getLogger("ticker")

SYMBOLS = ("ACME", "GLOBX", "INITECH", "UMBRL", "WAYNE")


@dataclass(frozen=True, slots=True)
class Tick:
    """One price quote."""

    symbol: str
    price: float
    at: float


def ticks(rate: float = 500.0) -> Iterator[Tick]:
    """An endless feed of random-walk prices, about ``rate`` ticks per second."""
    rng = random.Random(1)
    prices = dict.fromkeys(SYMBOLS, 100.0)
    while True:
        symbol = rng.choice(SYMBOLS)
        prices[symbol] *= math.exp(rng.gauss(0.0, 0.002))
        yield Tick(symbol, round(prices[symbol], 4), time.time())
        time.sleep(1.0 / rate)


def make_pipeline() -> pipekit.Pipeline:
    """Build the service: a moving average per symbol, and an alert on big moves."""
    pipe = pipekit.Pipeline("ticker")
    averages: dict[str, float] = {}

    def average(tick: Tick) -> tuple[Tick, float]:
        avg = averages.get(tick.symbol, tick.price) * 0.95 + tick.price * 0.05
        averages[tick.symbol] = avg
        return tick, avg

    def alert(pair: tuple[Tick, float]) -> object:
        tick, avg = pair
        if abs(tick.price - avg) / avg < 0.02:
            return pipekit.DROP                       # no output for ordinary ticks
        log.warning("%s at %.2f is %.1f%% off its average", tick.symbol, tick.price,
                    100 * (tick.price - avg) / avg)
        return pair

    pipe.add_stage("average", average, key=lambda t: t.symbol)   # in order per symbol
    pipe.add_stage("alert", alert)
    pipe.source(ticks)
    return pipe
