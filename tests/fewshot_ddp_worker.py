"""Run by tests/test_fewshot_evaluator.py under `torchrun --nproc_per_node=2` (gloo on CPU), not
collected by pytest. Usage: python -m torch.distributed.run ... tests/fewshot_ddp_worker.py OUT_DIR

Each process evaluates the same seeded model with the episodic evaluator (each embeds half of every
pool, rank 0 fits the episodes) and writes what it returned to OUT_DIR/rank<r>.json; `evaluate`
is also the single-process reference.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opl.engine.distributed import DistributedContext  # noqa: E402
from opl.eval.fewshot_evaluator import EpisodeEvaluator  # noqa: E402
from fewshot_fixtures import colour_benchmark, make_trainer  # noqa: E402


def evaluate(run_dir: Path) -> dict:
    data = colour_benchmark(per_class=7)  # odd pool sizes: the processes embed unequal shares
    trainer = make_trainer(run_dir, data, {}, eval_batch_size=5)
    evaluator = EpisodeEvaluator(pools=["val", "test"], n_way=5, shots=[1, 2], n_query=3, n_episodes=6,
                                 support_views=[2, 1])
    return evaluator(trainer)


def main() -> None:
    out = Path(sys.argv[1])
    ctx = DistributedContext.from_env()
    ctx.init(torch.device("cpu"), timeout_s=60)
    metrics = evaluate(out / f"run{ctx.rank}")
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(metrics))
    ctx.close(finished=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
