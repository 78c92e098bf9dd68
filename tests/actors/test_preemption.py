"""``SigtermStop`` on a real local Ray: a SIGTERM to this process during a training."""
from __future__ import annotations

import os
import signal

import pytest

from actors.preemption import Preempted, SigtermStop


def test_a_sigterm_during_the_last_step_still_stops_the_job(ray_local, tmp_path):
    """The workers had begun their last step when the SIGTERM came, so they finished without
    stopping: the job stops after the training all the same (not on to its next round), saying
    the result is saved; the previous SIGTERM handler is back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    with SigtermStop() as stop:
        with stop.training(tmp_path / "out"):
            os.kill(os.getpid(), signal.SIGTERM)  # a training that then ends on its own, unasked
        with pytest.raises(Preempted, match="when training had finished: its result is saved") as preempted:
            stop.raise_if_stopped()
        assert preempted.value.finished and preempted.value.step is None
        with pytest.raises(Preempted, match="outside training"):  # a second SIGTERM: at once
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_no_sigterm_no_stop(ray_local, tmp_path):
    with SigtermStop() as stop:
        with stop.training(tmp_path / "out"):
            pass
        stop.raise_if_stopped()
    assert stop.stopped_at is None


def test_a_sigterm_while_waiting_on_ray_stops_at_once(ray_local):
    """Outside training the driver may wait in ``ray.get`` (Ray Train's fit waiting for nodes, a
    Ray Data stage): Ray runs the handler there but passes on only a KeyboardInterrupt raised in
    it, so before 2026-12-02 the job's Preempted was lost and the wait went on. Now the wait ends
    and the job sees its Preempted."""
    import threading
    import time

    import ray

    @ray.remote(num_cpus=0)
    def slow() -> str:
        time.sleep(60)
        return "the wait went on"

    ref = slow.remote()
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    with pytest.raises(Preempted, match="outside training"):
        with SigtermStop():
            timer.start()
            ray.get(ref)
    timer.join()
    ray.cancel(ref, force=True)
