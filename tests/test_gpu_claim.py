"""A sweep job's GPU claim (opl/engine/gpu_claim.py, hydra/launcher=gpus): jobs spread over the GPUs,
never share one, wait while all are held, and a dead job's claim is free again. Lock files only, so
it runs without GPUs; the wiring in train.place is checked with two pretended GPUs."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import train
from opl.engine.gpu_claim import claim_gpu

NAMES = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]


def test_jobs_spread_over_the_gpus_and_never_share_one(tmp_path):
    first = claim_gpu(NAMES, 1, tmp_path)
    second = claim_gpu(NAMES, 1, tmp_path)  # GPU 1 is held: the next one
    third = claim_gpu(NAMES, 1, tmp_path)  # wraps around
    assert (first.index, second.index, third.index) == (1, 2, 0)
    second.release()
    assert claim_gpu(NAMES, 0, tmp_path).index == 2  # the only free one, whatever the job number


def test_a_job_waits_while_every_gpu_is_claimed(tmp_path):
    held = [claim_gpu(NAMES, i, tmp_path) for i in range(3)]
    notes = []
    timer = threading.Timer(0.3, held[2].release)
    timer.start()
    started = time.monotonic()
    claim = claim_gpu(NAMES, 0, tmp_path, poll_s=0.05, note=notes.append)
    assert claim.index == 2 and time.monotonic() - started >= 0.25
    assert len(notes) == 1 and "all 3 GPUs are claimed" in notes[0]
    timer.join()


def test_the_claim_of_a_process_that_died_is_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; from opl.engine.gpu_claim import claim_gpu; "
         f"c = claim_gpu({NAMES!r}, 0, Path({str(tmp_path)!r})); print(c.index, flush=True); time.sleep(60)"],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert claim_gpu(NAMES, 0, tmp_path).index == 1  # GPU 0 is held by the other process
    finally:
        holder.kill()
        holder.wait()
    assert claim_gpu(NAMES, 0, tmp_path).index == 0  # the kernel dropped the dead process's lock


def test_a_sweep_job_on_a_machine_with_two_gpus_takes_the_free_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(train, "cuda_names", lambda: NAMES[:2])
    monkeypatch.setattr(train, "default_lock_dir", lambda: tmp_path)
    other_job = claim_gpu(NAMES[:2], 0, tmp_path)  # a job beside it holds GPU 0
    job = train.Job(tmp_path / "run", [], multirun=True, number=2)  # 2 mod 2 = 0 would share GPU 0
    cfg = OmegaConf.create({"trainer": {"device": "auto"}})
    train.place(cfg, job)
    assert cfg.trainer.device == "cuda:1" and job.gpu.index == 1
    job.gpu.release()
    other_job.release()
    explicit = OmegaConf.create({"trainer": {"device": "cuda:0"}})  # a device named by the user is kept
    train.place(explicit, train.Job(tmp_path / "run", [], multirun=True, number=1))
    assert explicit.trainer.device == "cuda:0"
