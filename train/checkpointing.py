"""Checkpoints written off the training thread.

`CheckpointWriter.save` copies the state of the runs that checkpoint at a step into host buffers
(pinned on CUDA, reused from one checkpoint to the next) with copies queued on the device's stream,
and returns: the training thread goes on with the next step while one writer thread waits for the
copies, then writes each run's checkpoint (train/runs.py `save_checkpoint`: complete under a
temporary name, synced to disk, then renamed into place). The next `save` first waits for that
write, so at most one is in flight and the buffers are free again. `wait` is called before anything
reports a checkpoint (a stop on a signal, a non-finite loss, the end of training) and on every exit
from training, so a checkpoint named in a message is on disk, and an error of the write (a full
disk) is raised on the training thread.
"""

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .runs import save_checkpoint


@dataclass
class CheckpointJob:
    run_dir: Path
    step: int
    tensors: dict[str, torch.Tensor]
    """The state, wherever it lives (the trainer's own tensors: they are copied before `save` returns)."""
    state: dict
    keep_previous: bool = False


class CheckpointWriter:
    def __init__(self, write: Callable = save_checkpoint):
        """`write`: what writes one checkpoint on the writer thread (train/runs.py `save_checkpoint`)."""
        self._write_one = write
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future | None = None
        self._buffers: dict[Path, dict[str, torch.Tensor]] = {}

    def save(self, jobs: list[CheckpointJob]) -> None:
        """Copy the jobs' state, then write them in the background, after the previous save's write."""
        if not jobs:
            return
        self.wait()
        copies, events = [], []
        for job in jobs:
            buffers = self._host_buffers(job.run_dir, job.tensors)
            for name, tensor in job.tensors.items():
                buffers[name].copy_(tensor.detach(), non_blocking=tensor.is_cuda)
            copies.append(CheckpointJob(job.run_dir, job.step, buffers, job.state, job.keep_previous))
        for device in {t.device for job in jobs for t in job.tensors.values() if t.is_cuda}:
            events.append(torch.cuda.current_stream(device).record_event())  # on the stream the copies ran on
        self._pending = self._pool.submit(self._write, copies, events)

    def wait(self) -> None:
        """Until the write in flight, if any, is on disk; its error, if it failed, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _host_buffers(self, run_dir: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This run's host copies of its state, made once and reused while the shapes stay the same."""
        held = self._buffers.get(run_dir, {})
        if held.keys() != tensors.keys() or any(held[k].shape != v.shape or held[k].dtype != v.dtype
                                                for k, v in tensors.items()):
            held = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda) for k, v in tensors.items()}
            self._buffers[run_dir] = held
        return held


    def _write(self, copies: list[CheckpointJob], events: list) -> None:
        for event in events:
            event.synchronize()  # the device-to-host copies have landed
        for job in copies:
            self._write_one(job.run_dir, job.step, job.tensors, job.state, keep_previous=job.keep_previous)
