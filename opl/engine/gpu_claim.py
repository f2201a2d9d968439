"""One GPU per job for a sweep whose jobs run side by side on one machine (`hydra/launcher=gpus`).

Joblib's process pool gives the next job to whichever worker is free, so "job number mod GPU
count" can put two running jobs on one GPU. Instead a job claims a GPU that no other job holds: an
advisory `fcntl.flock` on a lock file named after the GPU's UUID (so processes that see the GPUs
under different CUDA_VISIBLE_DEVICES numbers still agree), held until the job ends. The kernel
drops the lock when the process dies, so a crash never leaves a GPU claimed.
"""

import fcntl
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch


def default_lock_dir() -> Path:
    """Shared by this user's jobs on this machine."""
    return Path(tempfile.gettempdir()) / f"opl-gpu-claims-{os.getuid()}"


def cuda_names() -> list[str]:
    """A name per visible CUDA device, the same in every process on the machine."""
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


class GpuClaim:
    """GPU `index` (of the names it was claimed from), held until `release()` or the process ends."""

    def __init__(self, index: int, handle):
        self.index = index
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops its flock
            self._handle = None


def _try_lock(path: Path):
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def claim_gpu(names: list[str], first: int, lock_dir: Path, poll_s: float = 5.0,
              note: Callable[[str], None] = print) -> GpuClaim:
    """Claim the first unclaimed of `names`, trying `first`, `first + 1`, ... (wrapping), so jobs that
    start together spread over the GPUs. While every GPU is claimed, wait (one note) and try again
    every `poll_s` seconds: two jobs never share a GPU."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        for offset in range(len(names)):
            index = (first + offset) % len(names)
            handle = _try_lock(lock_dir / f"{names[index]}.lock")
            if handle is not None:
                return GpuClaim(index, handle)
        if not waiting:
            note(f"note: all {len(names)} GPUs are claimed by other jobs (locks in {lock_dir}); waiting for one "
                 "to be released")
            waiting = True
        time.sleep(poll_s)
