"""The merge's writer thread and its piece pool (ops/merge/pipeline.py): order kept, memory bounded, buffers
recycled, a writer's error raised in the waiting thread. No wall-time assertions: waits are on events, and a
"still waiting" check can only pass too easily on a busy machine, never fail."""

from __future__ import annotations

import threading

import pytest

from loratools.ops.merge.pipeline import PiecePool, Pipeline

LONG = 60.0  # a bound for what must happen, never reached unless the code is wrong


def _blocked_pipe() -> tuple[Pipeline, threading.Event, list[str]]:
    """A pipeline whose first call waits for the returned event."""
    pipe, gate, done = Pipeline(), threading.Event(), []
    started = threading.Event()
    pipe.submit(lambda: (started.set(), gate.wait(LONG), done.append("first")))
    assert started.wait(LONG)
    return pipe, gate, done


def test_calls_run_in_order_and_ring_calls_wait_for_an_empty_queue() -> None:
    pipe, gate, done = _blocked_pipe()
    pipe.submit(lambda: done.append("pooled"), pooled=True)  # queues behind the blocked call at once
    ring = threading.Thread(target=pipe.submit, args=(lambda: done.append("ring"),))
    ring.start()
    ring.join(0.2)
    assert ring.is_alive(), "a ring buffer's call was queued behind another"
    gate.set()
    ring.join(LONG)
    pipe.close()
    assert done == ["first", "pooled", "ring"]


def test_pool_lends_within_its_budget_and_recycles() -> None:
    pipe = Pipeline()
    pool = PiecePool(pipe, budget=3 * (1000 + 4096))
    pieces = [pool.lend(1000, phase=i) for i in range(3)]
    assert all(pool.owns(p) for p in pieces) and not pool.owns(pieces[0].clone())
    assert [p.data_ptr() % 4096 for p in pieces] == [0, 1, 2]  # placed like their file positions
    fourth: list = []
    t = threading.Thread(target=lambda: fourth.append(pool.lend(1000)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not fourth, "lent beyond the budget"
    first = pieces[0].untyped_storage().data_ptr()
    pool.give_back(pieces[0])
    t.join(LONG)
    assert fourth[0].untyped_storage().data_ptr() == first  # the given-back buffer, not a new one
    assert pool.lent_bytes <= pool.budget
    pipe.close()


def test_a_piece_larger_than_the_budget_is_lent_alone() -> None:
    pipe = Pipeline()
    pool = PiecePool(pipe, budget=10)
    big = pool.lend(100_000)
    assert big.numel() == 100_000
    pool.give_back(big)
    assert pool.lend(50).numel() == 50
    pipe.close()


def test_a_writer_error_reaches_the_waiting_threads() -> None:
    pipe, gate, _ = _blocked_pipe()
    pool = PiecePool(pipe, budget=1)
    pool.lend(10)  # the budget is spent: the next lend waits for the writer

    def fail() -> None:
        raise OSError(28, "No space left on device")

    pipe.submit(fail, pooled=True)
    gate.set()
    with pytest.raises(OSError, match="No space"):
        pool.lend(10)
    with pytest.raises(OSError, match="No space"):
        pipe.submit(lambda: None)
    pipe.abort()
    assert not pipe.thread.is_alive()
