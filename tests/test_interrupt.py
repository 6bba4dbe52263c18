"""Ctrl-C as the loops meet it: the first signal stops at a safe point, repeated ones never cut the save."""
import os
import signal

import pytest

from mtt.interrupt import graceful_stop


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # delivered to the handler before os.kill returns (the main thread)


def test_a_signal_outside_abandonable_work_only_asks_to_stop():
    with graceful_stop() as stop:
        ctrl_c()
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # abandonable work after it does not start
            with stop.abandonable():
                pass


def test_a_second_signal_raises_unless_the_stop_is_saving():
    with graceful_stop() as stop:
        ctrl_c()
        with pytest.raises(KeyboardInterrupt):  # an escape from code that hangs
            ctrl_c()
    with graceful_stop() as stop:
        ctrl_c()
        stop.finish()  # the loop saves now: signals wait for the save, however many
        for _ in range(5):
            ctrl_c()
        assert stop.requested


def test_signals_after_abandoned_work_leave_the_save_to_finish():
    """The first signal abandons the work in progress; the ones that follow at once (a user pressing Ctrl-C
    repeatedly) must not interrupt the save the stop then makes."""
    with graceful_stop() as stop:
        with pytest.raises(KeyboardInterrupt):
            with stop.abandonable():
                ctrl_c()
        for _ in range(5):
            ctrl_c()  # the save would run here


def test_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with graceful_stop():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before
