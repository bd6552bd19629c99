"""usae.sae.interrupts: signals as flags between steps, raised to the real process with
os.kill (the handlers are the real ones)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from usae.sae.interrupts import StopSignals, TrainingInterrupted


@pytest.fixture(autouse=True)
def outside_handlers():
    """Handlers of the test's own for SIGINT and SIGTERM, around each test: a signal that
    StopSignals failed to catch lands here (recorded), whatever the process had before (a
    mutation worker ignores SIGINT and exits 0 on SIGTERM)."""
    caught: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    yield caught
    for sig, handler in old.items():
        signal.signal(sig, handler)


def test_training_interrupted_says_which_signal_and_step_and_is_a_ctrl_c():
    err = TrainingInterrupted(12, "SIGTERM")
    assert isinstance(err, KeyboardInterrupt) and err.step == 12
    assert str(err) == ("SIGTERM at step 12; a checkpoint of step 12 was saved — re-run with "
                        "--resume to continue")


@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_the_first_signal_becomes_a_flag(sig, name, outside_handlers):
    before = signal.getsignal(sig)
    with StopSignals() as stop:
        assert stop.received is None and not stop.pending
        os.kill(os.getpid(), sig)
        assert stop.received == name and not stop.pending
    assert signal.getsignal(sig) is before  # the old handlers are back
    assert outside_handlers == [], "StopSignals caught it, not the handler before it"
    os.kill(os.getpid(), sig)
    assert outside_handlers == [sig], "after the block, the signal goes where it went before"


def test_a_second_signal_interrupts_at_once():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGTERM"


def test_a_second_signal_during_a_save_waits_for_it():
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with stop.saving():
            os.kill(os.getpid(), signal.SIGINT)  # no exception inside the save
            assert stop.pending
        assert stop.pending and stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # after the save, a signal cuts at once again
            os.kill(os.getpid(), signal.SIGINT)


def test_saving_ends_even_when_the_save_fails():
    with StopSignals() as stop:
        with pytest.raises(OSError):
            with stop.saving():
                raise OSError("disk full")
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_first_signal_during_a_save_is_just_the_flag():
    with StopSignals() as stop:
        with stop.saving():
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM" and not stop.pending


def test_outside_the_main_thread_no_handler_is_installed():
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def worker():
        with StopSignals() as stop:
            seen.append((signal.getsignal(signal.SIGINT) is before, dict(stop._old)))

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert seen == [(True, {})]
