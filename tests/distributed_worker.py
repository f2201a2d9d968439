"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo on CPU), not collected by
pytest. Usage: python -m torch.distributed.run ... tests/distributed_worker.py MODE OUT_DIR

MODE "train": a BN-free model trained with CE + OPL (global scope) on digits by the shared Trainer,
global batch 64; each rank writes only into its own run folder (rank 1's must stay empty), rank 0
saves the final weights, and the run is stopped after epoch 2 of 4 by a callback (for the resume
test). Also checks OPL's global scope on a fixed batch against the single-process loss.
MODE "fail": rank 1 raises in its second epoch; the job must end, not hang.
MODE "consistency" (one launch for two checks that the ranks act as one): a batch-norm MLP trained
for one epoch, then evaluated (classification and PGD on the first ROBUST_LIMIT test images), each
rank recording its BN running mean as it enters the evaluation and the metrics it computed; then a
run whose loss turns NaN on rank 1 alone at step NAN_AT_STEP, each rank recording where it stopped.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import opl.engine.trainer  # noqa: E402
from opl.engine.distributed import DistributedContext  # noqa: E402
from opl.data.base import ImageTensors  # noqa: E402
from opl.errors import ConfigError, NonFiniteLossError  # noqa: E402
from opl.losses import OrthogonalProjectionLoss, ce_plus_opl  # noqa: E402
from test_distributed import NAN_AT_STEP, STOP_AFTER, batch_norm_evaluators, make_trainer  # noqa: E402


class Stop(Exception):
    pass


def opl_global_check(rank: int, world: int, out: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0])
    local = features[rank::world].clone().requires_grad_(True)
    loss = OrthogonalProjectionLoss(gamma=0.5, scope="global")(local, labels[rank::world])
    loss.backward()
    (out / f"opl_rank{rank}.json").write_text(json.dumps({"loss": loss.item(), "grad": local.grad.tolist()}))


class NaNFrom(nn.Module):
    """CE + OPL (global scope) whose loss is NaN from its `at_call`-th call on."""

    needs_pairs = True

    def __init__(self, at_call: int):
        super().__init__()
        self.inner, self.at_call, self.calls = ce_plus_opl(scope="global"), at_call, 0

    def forward(self, logits, features, labels, index=None):
        self.calls += 1
        parts = self.inner(logits, features, labels, index)
        if self.calls >= self.at_call:
            parts["loss"] = parts["loss"] * float("nan")
        return parts


def record_buffers_before_broadcast(rank: int, out: Path) -> None:
    """Wrap the Trainer's buffer broadcast to write this rank's first BN running mean as it was."""
    broadcast = opl.engine.trainer.broadcast_buffers

    def recording(model):
        mean = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d)).running_mean
        (out / f"running_mean_rank{rank}.json").write_text(json.dumps(mean.tolist()))
        broadcast(model)

    opl.engine.trainer.broadcast_buffers = recording


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    ctx = DistributedContext.from_env()
    ctx.init(torch.device("cpu"), timeout_s=60)
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "train":
        opl_global_check(rank, world, out)

        def stop(trainer, epoch, record):
            if epoch == STOP_AFTER:
                raise Stop

        trainer = make_trainer(out / f"rank{rank}", callbacks=(stop,))
        try:
            trainer.fit()
        except Stop:
            pass
        if rank == 0:
            torch.save(trainer.model.state_dict(), out / "weights_after_stop.pt")
    elif mode == "fail":
        def fail(trainer, epoch, record):
            if rank == 1 and epoch == 1:
                raise RuntimeError("rank 1 fails on purpose")

        make_trainer(out / f"rank{rank}", callbacks=(fail,), epochs=50).fit()
    elif mode == "consistency":
        record_buffers_before_broadcast(rank, out)

        def keep(trainer, epoch, record):
            (out / f"evaluation_rank{rank}.json").write_text(json.dumps(record))

        make_trainer(out / f"rank{rank}", callbacks=(keep,), epochs=1, batch_norm=True,
                     evaluators=batch_norm_evaluators()).fit()
        criterion = NaNFrom(NAN_AT_STEP if rank == 1 else 10 ** 9)
        try:
            make_trainer(out / f"nan_run_rank{rank}", criterion=criterion, log_every=NAN_AT_STEP).fit()
        except NonFiniteLossError as exc:
            (out / f"nan_rank{rank}.json").write_text(json.dumps({"step": exc.step, "message": str(exc)}))
        tiny = make_trainer(out / f"tiny_rank{rank}")
        one = tiny.data.test
        tiny.data = dataclasses.replace(tiny.data, test=ImageTensors(one.images[:1], one.labels[:1]))
        try:
            tiny.eval_loader("test")
        except ConfigError as exc:  # raised alike on every rank: none is left waiting for an empty shard
            (out / f"tiny_rank{rank}.txt").write_text(str(exc))
    ctx.close(finished=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
