"""Ending a multi-process run: every process leaves together and the process group is closed safely.

Call :func:`finish_distributed` as the last line of a script run under ``accelerate launch`` (after
``trainer.train()``, saving and pushing). ``hf-fdiv`` and the examples do.

Why a helper (issue 26). With gloo (CPU processes) a run could hang for ever at exit. A gloo worker thread
that has just finished a collective drops the work's last reference under the group's work mutex, and that
needs the GIL (the work holds a snapshot of the thread-local state, with Python objects in it). If the main
thread meanwhile runs ``~ProcessGroupGloo`` (for instance when the DDP ``Reducer`` that holds the group is
freed), it holds the GIL and waits for that mutex / joins that thread: a deadlock (pytorch/pytorch#56297).
``accelerator.wait_for_everyone(); accelerator.end_training()`` followed by the trainer going out of scope
is exactly that order. The order below was found by reproducing the hang: tests/test_teardown.py makes
gloo groups in a row and ends each one; the old order deadlocks there within five groups.
"""

from __future__ import annotations

import gc
import time

#: Seconds the main thread sleeps, with the GIL released, after the last collective: the gloo worker
#: threads drop the works they have finished (they need the GIL for it) before anything can free the group.
SETTLE_SECONDS = 0.1


def finish_distributed(trainer=None) -> None:
    """Leave a multi-process run together and close the process group without the gloo teardown deadlock.

    Order: (1) a barrier, whose handle is held so that its own worker thread never drops the last
    reference; (2) a short sleep with the GIL released (:data:`SETTLE_SECONDS`) so that the gloo worker
    threads finish dropping their completed works; (3) the references that keep the group alive are
    released (``trainer.accelerator.free_memory()``: accelerate's prepared models, optimizers, DeepSpeed
    engines; ``trainer.model_wrapped`` back to ``trainer.model``, so a DDP ``Reducer`` goes here and not
    at interpreter exit); (4) ``torch.distributed.destroy_process_group()`` while the interpreter is alive.

    Does nothing in a single process (no process group). After it, no collective works: call it last.
    (Not part of the trainers' end of training: ``save_model``, ``push_to_hub`` and ``evaluate`` still
    need the group after ``train()``, and only the script knows when it is done.)
    ``trainer`` is a ``transformers.Trainer`` (any hf_fdiv trainer) or None (a script without one).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    last = dist.barrier(async_op=True)
    last.wait()
    time.sleep(SETTLE_SECONDS)
    if trainer is not None:
        trainer.accelerator.free_memory()
        trainer.model_wrapped = trainer.model
    gc.collect()
    dist.destroy_process_group()
    del last
