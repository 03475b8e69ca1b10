"""Stop requests: SIGTERM / SIGUSR1 in plain runs, submitit's preemption / timeout signal (SIGUSR2) under SLURM.

Either way the training loop stops at the next optimizer-step boundary, after writing a mid-epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from conddetr.engine.loop import TrainingInterrupted

log = logging.getLogger(__name__)
PLAIN_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SUBMITIT_SIGNAL = signal.SIGUSR2  # submitit's SlurmJobEnvironment.USR_SIG: `#SBATCH --signal=USR2@90`, preemption
NON_MAIN_WAIT_S = 120.0  # how long a non-zero rank waits for rank 0's requeue to end the job


class StopRequest:
    """What the loop polls (`is_set`) and, under submitit, the requeue handler it hands over to after saving.

    Why the hand-over: submitit's USR2 handler runs in the main thread, between two bytecodes of the training
    loop (which runs in that same thread), calls TrainJob.checkpoint(), requeues the job and exits at once. It
    cannot wait for the loop (the loop is suspended under it) and the live weights may be mid-step (half an
    optimizer update), so nothing consistent can be saved from inside it. Instead our handler replaces
    submitit's for the run: while training steps run (`training()`), it only records the signal and sets the
    flag; the loop finishes the current step, saves a mid-epoch checkpoint and raises TrainingInterrupted, and
    `watch` then calls submitit's own handler (TrainJob.checkpoint(), requeue, exit) with the recorded signal.
    A signal outside the training steps (start-up, evaluation, the epoch-end save) goes to submitit's handler
    at once, as before: the requeued job resumes from the last checkpoint on disk.
    """

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.in_training = False
        self.deferred: tuple[Callable, int] | None = None  # submitit's handler and the signal it must see
        self.submitit_handler: Callable | None = None  # set under submitit: what a stop hands over to

    def is_set(self) -> bool:
        return self.flag.is_set()

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Mark the training steps: a submitit signal arriving now is deferred to the next step boundary."""
        self.in_training = True
        try:
            yield
        finally:
            self.in_training = False

    def on_plain_signal(self, signum: int, frame) -> None:
        log.warning("received %s: saving a checkpoint after the current optimizer step", signal.Signals(signum).name)
        self.flag.set()

    def make_submitit_handler(self, submitit_handler: Callable) -> Callable:
        self.submitit_handler = submitit_handler

        def handler(signum: int, frame) -> None:
            if self.deferred is not None:
                log.warning("received %s again: already stopping", signal.Signals(signum).name)
                return
            if not self.in_training:
                submitit_handler(signum, frame)  # requeue now: the last checkpoint on disk is the resume point
                return
            log.warning("received %s: checkpointing after the current optimizer step, then requeueing",
                        signal.Signals(signum).name)  # fmt: skip
            self.deferred = (submitit_handler, signum)
            self.flag.set()

        return handler

    def hand_over(self) -> None:
        """After the stop checkpoint: under submitit, run its handler (rank 0 requeues and exits; others wait).

        Every rank gets here at the same step (the stop travels in the per-step all-reduce), but not every rank
        need have seen the signal itself: SLURM signals the tasks one by one, and one may land just after a rank's
        last poll. Under submitit only its USR2 can stop training, so the job is requeued either way; rank 0 must
        do it even when the signal that stopped the job reached another rank (it would otherwise fail the job).
        """
        if self.submitit_handler is None:
            return  # plain run: TrainingInterrupted goes up (exit 143)
        if self.deferred is None:
            log.warning("stopping with the other ranks: the preemption / timeout signal reached another rank first")
        signum = self.deferred[1] if self.deferred is not None else SUBMITIT_SIGNAL
        self.submitit_handler(signum, None)  # rank 0: checkpoint() -> requeue -> sys.exit; raises if not requeued
        # Other ranks return from it: submitit never exits them, as a task that ends before rank 0 has requeued
        # could take the job down with it (srun --kill-on-bad-exit). The requeue (or rank 0's failure) ends them.
        log.info("waiting up to %.0f s for rank 0's requeue to end this task", NON_MAIN_WAIT_S)
        time.sleep(NON_MAIN_WAIT_S)


@contextlib.contextmanager
def watch() -> Iterator[StopRequest]:
    """Install the stop handlers for the duration of training (main thread only; restored on exit).

    Plain runs: SIGTERM / SIGUSR1 set the flag. Under submitit (SUBMITIT_EXECUTOR set): its SIGUSR2 handler is
    wrapped as StopRequest describes; submitit's SIGTERM "bypass" is left alone.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[int, object] = {}
    if os.environ.get("SUBMITIT_EXECUTOR"):
        current = signal.getsignal(SUBMITIT_SIGNAL)
        if callable(current):  # submitit's DebugExecutor installs none: nothing to wrap
            previous[SUBMITIT_SIGNAL] = signal.signal(SUBMITIT_SIGNAL, stop.make_submitit_handler(current))
    else:
        previous = {s: signal.signal(s, stop.on_plain_signal) for s in PLAIN_SIGNALS}
    try:
        yield stop
    except TrainingInterrupted:
        for s, h in previous.items():
            signal.signal(s, h)
        previous = {}
        stop.hand_over()
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
