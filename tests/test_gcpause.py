"""The collector pause nests, survives errors and never leaves the collector off."""

from __future__ import annotations

import gc
import threading

import pytest

from core.gcpause import paused_gc


def test_nested_pauses_switch_the_collector_back_on_only_at_the_outermost_end() -> None:
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_error_inside_still_ends_the_pause() -> None:
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_pauses_in_threads_leave_the_collector_on() -> None:
    """The interleaving that breaks a naive save-and-restore: A pauses, B pauses, A ends, B ends."""
    a_paused, b_paused, a_done = threading.Event(), threading.Event(), threading.Event()
    seen_by_b_after_a_ended: list[bool] = []

    def thread_a() -> None:
        with paused_gc():
            a_paused.set()
            b_paused.wait(5)
        a_done.set()

    def thread_b() -> None:
        a_paused.wait(5)
        with paused_gc():
            b_paused.set()
            a_done.wait(5)
            seen_by_b_after_a_ended.append(gc.isenabled())

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen_by_b_after_a_ended == [False]  # A's end did not cut B's pause short
    assert gc.isenabled()
