"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo on CPU), not collected by
pytest. Usage: python -m torch.distributed.run ... tests/distributed_worker.py MODE OUT_DIR

MODE "train": a BN-free model trained with CE + OPL (global scope) on digits by the shared Trainer,
global batch 64; each rank writes only into its own run folder (rank 1's must stay empty), rank 0
saves the final weights, and the run is stopped after epoch 2 of 4 by a callback (for the resume
test). Also checks OPL's global scope on a fixed batch against the single-process loss.
MODE "fail": rank 1 raises in its second epoch; the job must end, not hang.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opl.engine.distributed import DistributedContext  # noqa: E402
from opl.losses import OrthogonalProjectionLoss  # noqa: E402
from test_distributed import STOP_AFTER, make_trainer  # noqa: E402


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
    ctx.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
