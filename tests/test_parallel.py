"""platform/parallel.ordered_map: order, the bound on work in flight, and no worker thread left behind
however the caller stops (an error in the loop body, in fn, in the items; close())."""
from __future__ import annotations

import threading
import time

import pytest

from imgkit.platform.parallel import ordered_map


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("imgkit_")]


def _slow(x):
    time.sleep(0.005)
    return x * 2


def test_results_come_in_input_order_with_a_bounded_lookahead():
    seen = []

    def items():
        for i in range(100):
            seen.append(i)
            yield i
    with ordered_map(_slow, items(), workers=2, inflight=5) as results:
        for n, r in enumerate(results):
            assert r == 2 * n
            assert len(seen) <= n + 5  # never more than `inflight` ahead of the consumer
    assert n == 99 and _workers() == []


def test_a_caller_raising_mid_iteration_leaves_no_worker_even_while_it_holds_the_iterator():
    """The error handler (here: the test) keeps the traceback and with it the iterator: with a
    generator, its pool stayed alive (2 idle threads) until the traceback was dropped."""
    held = None
    with pytest.raises(ValueError):
        with ordered_map(_slow, range(1000), workers=2) as held:
            for r in held:
                if r == 6:
                    raise ValueError("the caller's own error")
    assert held is not None and _workers() == []
    assert next(held, "ended") == "ended"


def test_an_error_of_fn_ends_the_pool_and_reaches_the_caller():
    def fn(x):
        if x == 10:
            raise OSError("read failed")
        return x
    results = ordered_map(fn, range(1000), workers=2)
    got = []
    with pytest.raises(OSError, match="read failed"):
        for r in results:
            got.append(r)
    assert got == list(range(10)) and _workers() == []


def test_an_error_of_the_items_ends_the_pool():
    def items():
        yield from range(20)
        raise RuntimeError("bad index")
    results = ordered_map(_slow, items(), workers=2)
    with pytest.raises(RuntimeError, match="bad index"):
        list(results)
    assert _workers() == []


def test_close_mid_iteration_cancels_the_rest_and_closes_the_items():
    started, finished = [], []

    def items():
        try:
            yield from range(1000)
        finally:
            finished.append(True)

    def fn(x):
        started.append(x)
        time.sleep(0.01)
        return x
    results = ordered_map(fn, items(), workers=2, inflight=6)
    assert next(results) == 0
    results.close()
    assert _workers() == [] and finished == [True]
    assert len(started) <= 6  # what was queued but not started was cancelled
    assert list(results) == []


def test_one_worker_runs_inline():
    with ordered_map(lambda x: threading.current_thread(), range(3), workers=1) as results:
        assert list(results) == [threading.current_thread()] * 3
