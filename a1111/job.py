"""A SeqLoRA training or preview as one of A1111's jobs.

A1111 runs one job at a time under ``call_queue.queue_lock`` and publishes the running job's
state (``shared.state``) through its progress API (``/sdapi/v1/progress``, ``/internal/progress``)
and its Interrupt endpoint. Holding the lock also keeps the checkpoint from being switched while a
concept trains (A1111 switches under the same lock).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def a1111_job(kind: str) -> Iterator[None]:
    """Run the block as A1111 job ``kind`` (seqlora-train, seqlora-preview)."""
    from modules import call_queue, progress, shared

    task_id = progress.create_task_id(kind)
    progress.add_task_to_queue(task_id)
    with call_queue.queue_lock:
        shared.state.begin(job=kind)
        progress.start_task(task_id)
        try:
            yield
        finally:
            progress.finish_task(task_id)
            shared.state.end()


def report_progress(step: int, total: int, loss: float) -> None:
    """One finished minibatch, as A1111's progress API reports jobs."""
    from modules import shared

    shared.state.job_count = total
    shared.state.job_no = step
    shared.state.textinfo = f"SeqLoRA: step {step} / {total}, loss {loss:.4f}"


def interrupted() -> bool:
    """A1111's Interrupt (its button, ``/sdapi/v1/interrupt``) was pressed during this job."""
    from modules import shared

    return bool(shared.state.interrupted)
