"""Tests for pipekit.queues: the bounded, chunked channel between stages."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from _helpers import wait_until

from pipekit.queues import Channel, ChannelClosed, ChannelFull, ChannelStats, Chunk


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _in_thread(fn: Any) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``fn`` in a thread; return the thread and a list that receives its error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


# -- capacity and the non-blocking put ---------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -3])
def test_capacity_below_one_is_refused_and_named(capacity: int) -> None:
    with pytest.raises(ValueError, match=f"capacity must be >= 1 \\(got {capacity}\\)"):
        Channel(capacity)


def test_put_nowait_fills_to_capacity_then_raises_full() -> None:
    ch = Channel(3)
    for i in range(3):
        ch.put_nowait(i)
    assert ch.depth == 3
    assert ch.full
    with pytest.raises(ChannelFull):
        ch.put_nowait(99)
    assert ch.depth == 3  # nothing buffered beyond capacity
    assert ch.get_batch(10) is not None


def test_get_batch_is_fifo_and_returns_none_when_empty() -> None:
    ch = Channel(10)
    assert ch.get_batch(5) is None
    for i in range(7):
        ch.put(i)
    first = ch.get_batch(3)
    rest = ch.get_batch(100)
    assert first is not None
    assert rest is not None
    assert first.items == [0, 1, 2]
    assert rest.items == [3, 4, 5, 6]
    assert ch.get_batch(1) is None
    assert ch.depth == 0


def test_put_of_an_empty_chunk_is_a_no_op() -> None:
    ch = Channel(1)
    ch.put_nowait("x")
    ch.put_chunk(Chunk([]), timeout=0)  # would time out if it waited for room
    assert ch.statistics().put_total == 1


# -- blocking put, timeouts and close ----------------------------------------------------


def test_put_blocks_while_full_until_a_consumer_takes_items() -> None:
    ch = Channel(2)
    ch.put(1)
    ch.put(2)
    t, errors = _in_thread(lambda: ch.put(3))
    wait_until(lambda: ch.statistics().waiting_producers == 1)
    assert t.is_alive()
    assert ch.depth == 2
    batch = ch.get_batch(1)
    assert batch is not None
    assert batch.items == [1]
    t.join(5)
    assert not t.is_alive()
    assert not errors
    rest = ch.get_batch(10)
    assert rest is not None
    assert rest.items == [2, 3]
    assert ch.statistics().waiting_producers == 0


@pytest.mark.parametrize("timeout", [0, 0.01])
def test_put_with_timeout_raises_full_and_stops_waiting(timeout: float) -> None:
    ch = Channel(1)
    ch.put("a")
    with pytest.raises(ChannelFull):
        ch.put("b", timeout=timeout)
    stats = ch.statistics()
    assert stats.depth == 1
    assert stats.waiting_producers == 0
    assert stats.put_total == 1


def test_put_times_out_by_the_injected_clock() -> None:
    clock = FakeClock()
    ch = Channel(1, clock=clock)
    ch.put("a")

    def advance_while_waiting() -> None:
        wait_until(lambda: ch.statistics().waiting_producers == 1)
        clock.now += 60.0  # the deadline passes on the channel's own clock
        with ch._lock:  # wake the producer so it looks at the clock again
            ch._not_full.notify_all()

    t, _ = _in_thread(advance_while_waiting)
    with pytest.raises(ChannelFull):
        ch.put("b", timeout=30.0)
    t.join(5)


def test_close_wakes_blocked_producers_with_closed() -> None:
    ch = Channel(1)
    ch.put("a")
    threads = [_in_thread(lambda: ch.put("b")) for _ in range(3)]
    wait_until(lambda: ch.statistics().waiting_producers == 3)
    ch.close()
    for t, errors in threads:
        t.join(5)
        assert not t.is_alive()
        assert len(errors) == 1
        assert isinstance(errors[0], ChannelClosed)
    assert ch.statistics().waiting_producers == 0
    assert ch.depth == 1  # what was in stays for the consumer


def test_puts_after_close_are_refused_but_forced_puts_go_in() -> None:
    ch = Channel(2)
    ch.close()
    with pytest.raises(ChannelClosed):
        ch.put(1)
    with pytest.raises(ChannelClosed):
        ch.put_nowait(1)
    with pytest.raises(ChannelClosed):
        ch.put_chunk(Chunk([1, 2]))
    ch.put_chunk(Chunk([7, 8, 9]), force=True)  # items the stage already owned
    batch = ch.get_batch(10)
    assert batch is not None
    assert batch.items == [7, 8, 9]


def test_consumer_wait_returns_when_items_arrive_or_on_close() -> None:
    ch = Channel(4)
    assert ch.wait(0.001) is False  # nothing came
    result: list[bool] = []
    t, _ = _in_thread(lambda: result.append(ch.wait(10)))
    wait_until(lambda: ch.statistics().waiting_consumers == 1)
    ch.put("x")
    t.join(5)
    assert result == [True]
    assert ch.get_batch(1) is not None
    t2, _ = _in_thread(lambda: result.append(ch.wait(10)))
    wait_until(lambda: ch.statistics().waiting_consumers == 1)
    ch.close()
    t2.join(5)
    assert result == [True, False]  # closed and empty
    assert ch.statistics().waiting_consumers == 0


# -- chunks larger than the free space -------------------------------------------------


def test_a_chunk_waits_for_room_for_all_of_it_not_part() -> None:
    ch = Channel(4)
    ch.put_chunk(Chunk([1, 2]))
    t, errors = _in_thread(lambda: ch.put_chunk(Chunk([3, 4, 5])))
    wait_until(lambda: ch.statistics().waiting_producers == 1)
    assert ch.depth == 2  # not split to fill the two free slots
    taken = ch.get_batch(1)
    assert taken is not None
    t.join(5)
    assert not errors
    assert ch.depth == 4
    rest = ch.get_batch(10)
    assert rest is not None
    assert rest.items == [2, 3, 4, 5]


def test_a_chunk_larger_than_capacity_waits_for_an_empty_channel() -> None:
    ch = Channel(3)
    ch.put("first")
    t, errors = _in_thread(lambda: ch.put_chunk(Chunk(list(range(5)))))
    wait_until(lambda: ch.statistics().waiting_producers == 1)
    assert ch.depth == 1
    assert ch.get_batch(1) is not None
    t.join(5)
    assert not errors
    assert ch.depth == 5  # the one documented overshoot: a whole oversize chunk
    with pytest.raises(ChannelFull):
        ch.put_nowait("more")


# -- contexts and attempts travel with their items ----------------------------------------


def test_split_keeps_contexts_and_attempts_aligned() -> None:
    chunk = Chunk(["a", "b", "c", "d"], ["ca", "cb", "cc", "cd"], [0, 1, 2, 3], 5.0)
    head, tail = chunk.split(1)
    assert (head.items, head.ctxs, head.attempts) == (["a"], ["ca"], [0])
    assert (tail.items, tail.ctxs, tail.attempts) == (["b", "c", "d"], ["cb", "cc", "cd"],
                                                      [1, 2, 3])
    assert head.enqueued == tail.enqueued == 5.0
    bare_head, bare_tail = Chunk([1, 2, 3]).split(2)
    assert (bare_head.ctxs, bare_head.attempts, bare_tail.ctxs, bare_tail.attempts) == (
        None, None, None, None)


def test_join_fills_missing_contexts_and_attempts_in_place() -> None:
    joined = Chunk.join([
        Chunk([1, 2], None, None, 1.0),
        Chunk([3], ["c3"], None, 2.0),
        Chunk([4, 5], None, [2, 1], 3.0),
    ])
    assert joined.items == [1, 2, 3, 4, 5]
    assert joined.ctxs == [None, None, "c3", None, None]
    assert joined.attempts == [0, 0, 0, 2, 1]
    assert joined.enqueued == 1.0  # the oldest part's arrival
    plain = Chunk.join([Chunk([1]), Chunk([2])])
    assert plain.ctxs is None
    assert plain.attempts is None
    one = Chunk([1], ["c"])
    assert Chunk.join([one]) is one


def test_get_batch_across_chunks_keeps_per_item_data_aligned() -> None:
    ch = Channel(100)
    ch.put("p0")
    ch.put("p1", "ctx1")
    ch.put_chunk(Chunk(["r0", "r1", "r2"], None, [3, 4, 5]))
    ch.put_chunk(Chunk(["s0", "s1"], ["cs0", "cs1"], [7, 8]))
    batch = ch.get_batch(4)  # splits the third chunk
    assert batch is not None
    assert batch.items == ["p0", "p1", "r0", "r1"]
    assert batch.ctxs == [None, "ctx1", None, None]
    assert batch.attempts == [0, 0, 3, 4]
    rest = ch.get_batch(10)
    assert rest is not None
    assert rest.items == ["r2", "s0", "s1"]
    assert rest.ctxs == [None, "cs0", "cs1"]
    assert rest.attempts == [5, 7, 8]


def test_put_records_a_context_per_item_only_when_given() -> None:
    ch = Channel(5)
    ch.put(1)
    only = ch.get_batch(5)
    assert only is not None
    assert only.ctxs is None
    ch.put_nowait(2, "ctx")
    with_ctx = ch.get_batch(5)
    assert with_ctx is not None
    assert with_ctx.ctxs == ["ctx"]


# -- statistics, listener, drain, clock ----------------------------------------------------


def test_statistics_is_a_frozen_snapshot_that_tracks_depth_peak_and_totals() -> None:
    ch = Channel(10)
    for i in range(6):
        ch.put(i)
    ch.get_batch(4)
    ch.put_chunk(Chunk([10, 11]))
    stats = ch.statistics()
    assert stats == ChannelStats(depth=4, capacity=10, peak=6, waiting_producers=0,
                                 waiting_consumers=0, closed=False, put_total=8)
    with pytest.raises(AttributeError):
        stats.depth = 0  # type: ignore[misc]
    ch.close()
    assert ch.statistics().closed
    assert ch.closed
    assert stats.closed is False  # the old snapshot does not change


def test_listener_is_set_on_every_put_and_on_close() -> None:
    ch = Channel(5)
    ev = threading.Event()
    ch.set_listener(ev)
    ch.put(1)
    assert ev.is_set()
    ev.clear()
    ch.put_nowait(2)
    assert ev.is_set()
    ev.clear()
    ch.put_chunk(Chunk([3]))
    assert ev.is_set()
    ev.clear()
    ch.close()
    assert ev.is_set()


def test_drain_empties_the_channel_and_wakes_producers() -> None:
    ch = Channel(2)
    ch.put_chunk(Chunk([1, 2]))
    t, errors = _in_thread(lambda: ch.put(3))
    wait_until(lambda: ch.statistics().waiting_producers == 1)
    drained = ch.drain()
    assert [x for c in drained for x in c.items] == [1, 2]
    t.join(5)
    assert not errors
    rest = ch.get_batch(5)
    assert rest is not None
    assert rest.items == [3]


def test_enqueued_time_comes_from_the_injected_clock() -> None:
    clock = FakeClock(50.0)
    ch = Channel(5, clock=clock)
    assert ch.oldest_enqueued() is None
    ch.put("a")
    clock.now = 60.0
    ch.put("b")
    assert ch.oldest_enqueued() == 50.0
    ch.get_batch(1)
    assert ch.oldest_enqueued() == 60.0
    kept = Chunk(["c"], enqueued=7.0)  # a chunk that already waited upstream keeps its time
    ch.put_chunk(kept)
    ch.get_batch(1)
    assert ch.oldest_enqueued() == 7.0


def test_many_producers_and_a_consumer_move_every_item_exactly_once() -> None:
    ch = Channel(8)
    n_producers, per = 4, 500
    got: list[int] = []

    def produce(base: int) -> None:
        for i in range(per):
            if i % 3 == 0:
                ch.put_chunk(Chunk([base + i]))
            else:
                ch.put(base + i, timeout=10)

    producers = [threading.Thread(target=produce, args=(k * per,), daemon=True)
                 for k in range(n_producers)]
    for t in producers:
        t.start()
    while len(got) < n_producers * per:
        if not ch.wait(5):
            break
        batch = ch.get_batch(5)
        if batch is not None:
            assert len(batch) <= 5
            got.extend(batch.items)
    for t in producers:
        t.join(5)
    assert sorted(got) == list(range(n_producers * per))
    assert ch.statistics().peak <= 8  # bounded: backpressure, not buffering
    assert ch.statistics().put_total == n_producers * per


@pytest.mark.parametrize("n", [0, -1])
def test_get_batch_of_no_items_takes_nothing(n: int) -> None:
    ch = Channel(3)
    ch.put("a")
    assert ch.get_batch(n) is None
    assert ch.depth == 1
