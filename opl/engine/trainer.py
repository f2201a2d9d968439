"""The one trainer every experiment runs on.

It owns the loop, the schedule, precision, compilation, checkpoints, logging and evaluation
epochs; the method is a training step object (`opl.methods`: standard, adversarial, ...) and the
evaluation is a set of evaluator objects (`opl.engine.evaluate`), both built outside and handed in.
A step: batch (already augmented on the device) -> step(x, y, index) -> parts -> backward ->
fused optimizer step -> per-iteration LR schedule. The step module (model + loss) is what
`torch.compile` captures whole (CUDA graphs on CUDA); `trainer.capture` widens that region to the
augmentation and to the whole update (opl/engine/capture.py). Running sums stay on the device; the
host synchronises once per `log_every` steps and at the end of each epoch.
"""

import contextlib
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from opl.data.augment import DeferredAugment
from opl.data.base import DataSpec
from opl.data.loaders import build_loader
from opl.engine.capture import CAPTURE_MODES, AugmentedStep, WholeStep
from opl.engine.checkpoint import (atomic_save, capture_rng_state, load_checkpoint, load_model_state, restore_rng_state,
                                   tensors_to)
from opl.engine.distributed import broadcast_buffers, world
from opl.engine.evaluate import ClassificationEvaluator, predict
from opl.engine.schedule import build_scheduler, scheduled_lrs, set_iteration
from opl.errors import CheckpointError, ConfigError, NonFiniteLossError
from opl.logging import PROGRESS_MODES, JsonlWriter, Progress
from opl.methods.base import TrainingStep
from opl.runinfo import resolve_device
from opl.seed import set_deterministic

CHECKPOINT_FORMAT = 2
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs
# The modes torch.compile documents (torch 2.11 on), plus auto.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOADERS = ("auto", "device", "dataloader")
NO_BAD_STEP = torch.iinfo(torch.int64).max  # what a rank without a non-finite loss contributes to the MIN
# The epoch line's short names of the metrics it has always shown; other accuracies keep their keys.
EPOCH_LINE_NAMES = {"train_top1": "train@1", "test_top1": "test@1", "test_top5": "test@5", "test_adv_top1": "adv@1",
                    "val_top1": "val@1"}


@dataclass
class TrainerConfig:
    epochs: int = 200
    batch_size: int = 128  # the global batch: each of W data-parallel processes takes batch_size / W
    eval_batch_size: int = 1000  # per process
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    channels_last: bool = True
    compile: bool | str = "auto"  # auto: on for CUDA, off for CPU
    compile_mode: str = "auto"  # auto: "reduce-overhead" (CUDA graphs) on CUDA, "default" elsewhere
    # How much of a step is one captured region (opl/engine/capture.py): step_only (model + loss, the
    # reference), with_augment (+ applying the augmentation), whole_step (+ backward, optimizer and LR
    # update: one CUDA-graph replay per step on CUDA).
    capture: str = "step_only"
    loader: str = "auto"  # auto (device-resident on CUDA for in-memory data) | device | dataloader
    num_workers: int = 4
    cpu_threads: int | None = None  # torch.set_num_threads; None keeps PyTorch's default (one per core)
    # Keep the last, smaller batch of each epoch (as PyTorch's DataLoader does by default); a last
    # batch of one sample is still dropped when the loss compares pairs (OPL).
    drop_last: bool = False
    eval_every: int = 1
    log_every: int = 50  # steps between host synchronisations (NaN check, progress)
    ckpt_every: int = 1
    deterministic: bool = False
    sync_bn: bool = False  # data-parallel runs: batch-norm statistics over the global batch
    # The authors' protocol: the best TEST accuracy over the epochs after this one (model selection
    # on the test set). Reported under a name that says so, never as the main number.
    test_selection_after_epoch: int | None = None
    progress: str = "auto"  # auto | bar | line | silent

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "eval_every", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ConfigError(f"trainer.amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        if self.compile not in (True, False, "auto"):
            raise ConfigError(f"trainer.compile must be true, false or auto, got {self.compile!r}")
        for name, accepted in (("compile_mode", COMPILE_MODES), ("loader", LOADERS), ("progress", PROGRESS_MODES)):
            if getattr(self, name) not in accepted:
                raise ConfigError(f"trainer.{name} must be one of {', '.join(accepted)}, got {getattr(self, name)!r}")
        if self.capture not in CAPTURE_MODES:
            raise ConfigError(f"trainer.capture must be one of {', '.join(CAPTURE_MODES)}, got {self.capture!r}")
        if self.num_workers < 0:
            raise ConfigError(f"trainer.num_workers must be >= 0, got {self.num_workers}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"trainer.cpu_threads must be >= 1 or null, got {self.cpu_threads}")


@dataclass
class TrainState:
    """Everything beyond model/optimizer that a resumed run needs to continue identically."""

    epoch: int = 0
    global_step: int = 0
    elapsed_s: float = 0.0
    best_val: dict | None = None  # {"epoch", "val_top1", "test": {...}}
    best_test: dict | None = None  # authors' protocol
    last_eval: dict | None = None
    images_per_s: list = field(default_factory=list)  # steady-state epochs only (no warm-up)
    warmup_epoch_s: list = field(default_factory=list)  # first epoch of each process (compile, caches)


class Trainer:
    def __init__(self, cfg: TrainerConfig, step: TrainingStep, data: DataSpec, optimizer_factory: Callable,
                 schedule: dict, run_dir: str | Path, seed: int = 0, evaluators: dict | None = None,
                 loggers: tuple = (), callbacks: tuple = (), config_signature: str | None = None):
        self.cfg = cfg
        self.seed = seed
        self.data = data
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.loggers = list(loggers)
        self.callbacks = list(callbacks)
        self.config_signature = config_signature
        self.evaluators = dict(evaluators) if evaluators is not None else {"classification": ClassificationEvaluator()}
        self.device = resolve_device(cfg.device)
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        if cfg.batch_size % self.world_size:
            raise ConfigError(f"trainer.batch_size={cfg.batch_size} (the global batch) must divide among the "
                              f"{self.world_size} processes")
        self.local_batch_size = cfg.batch_size // self.world_size
        if step.needs_pairs and self.local_batch_size < 2:
            raise ConfigError("OPL compares pairs of samples in a batch: trainer.batch_size must be >= 2 per process")
        set_deterministic(cfg.deterministic)
        if cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)

        amp = cfg.amp if cfg.amp != "auto" else ("bf16" if self.device.type == "cuda" else "none")
        if amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("trainer.amp=fp16 needs CUDA; use bf16 or none on CPU")
        self.amp = amp
        self._check_capture(cfg, step, data)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        # A CUDA graph of the whole step must not hold autocast's cache of cast weights (PyTorch's
        # CUDA-graph notes); compiled regions trace the casts and never use it.
        cache = cfg.capture != "whole_step"
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype, cache_enabled=cache)) if dtype \
            else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.sync_bn and self.device.type != "cuda":
            raise ConfigError(f"trainer.sync_bn needs CUDA (SyncBatchNorm), the device is {self.device}; use sync_bn=false")
        if cfg.sync_bn and self.world_size > 1:
            step = torch.nn.SyncBatchNorm.convert_sync_batchnorm(step)
        self.training_step = step.to(self.device, memory_format=memory_format)
        self.model, self.criterion = step.model, step.criterion
        step.bind(self.autocast, self.device, seed, cfg.epochs)

        self.loader_args = dict(device=self.device, kind=cfg.loader, num_workers=cfg.num_workers,
                                channels_last=cfg.channels_last, rank=self.rank, world=self.world_size)
        self.train_loader = build_loader(data, data.train, True, self.local_batch_size, seed=seed,
                                         drop_last=cfg.drop_last, min_batch=2 if step.needs_pairs else 1,
                                         **self.loader_args)
        if len(self.train_loader) == 0:
            raise ConfigError(f"trainer.batch_size={cfg.batch_size} exceeds the {len(data.train)} training samples "
                              "(with trainer.drop_last=true no batch is left)")
        self._eval_loaders = {}
        self._stream: Iterator | None = None
        self._stream_epoch = 0
        # Beyond step_only the loader only draws each batch's augmentation parameters, and the step
        # region applies them (`_train_step` passes them on).
        self.deferred: DeferredAugment | None = None
        forward = step
        if cfg.capture != "step_only":
            self.deferred = DeferredAugment(self.train_loader.augment)
            self.train_loader.augment = self.deferred
            forward = AugmentedStep(step, self.deferred.augment, memory_format)

        self.optimizer = optimizer_factory(self.model.parameters(), **({"fused": True} if self.device.type == "cuda" else {}))
        self.scheduler = build_scheduler(self.optimizer, len(self.train_loader), cfg.epochs, **schedule)

        # One process per device: DDP averages the gradients; the step (model + loss) is what it wraps.
        self.step = forward if self.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.cudagraphs = False  # CUDA graphs of torch.compile (its cudagraph trees) around the step
        if cfg.compile is True and step.compile_refusal:
            raise ConfigError(f"trainer.compile=true is not supported by {type(step).__name__}: {step.compile_refusal}")
        if cfg.compile is True or (cfg.compile == "auto" and self.device.type == "cuda" and not step.compile_refusal):
            # CUDA graphs for the launch-bound single-device step; data-parallel steps (large models,
            # gradient all-reduce in the backward) are compiled without them, and whole_step records
            # its own graph around the compiled code.
            mode = cfg.compile_mode if cfg.compile_mode != "auto" else (
                "reduce-overhead" if self.device.type == "cuda" and self.world_size == 1
                and cfg.capture != "whole_step" else "default")
            if cfg.capture == "whole_step" and mode in CUDAGRAPH_MODES:
                raise ConfigError(f"trainer.capture=whole_step records one CUDA graph of the whole step itself; "
                                  f"trainer.compile_mode={mode} would nest torch.compile's CUDA graphs inside it "
                                  "(use auto, default or max-autotune-no-cudagraphs)")
            self.cudagraphs = mode in CUDAGRAPH_MODES and self.device.type == "cuda"
            # Static shapes: a smaller last batch is one more specialised graph, not a dynamic-shape
            # recompilation of the main one.
            self.step = torch.compile(self.step, mode=mode, dynamic=False)
        self.whole_step = None
        if cfg.capture == "whole_step":
            self.whole_step = WholeStep(self.step, self.optimizer, self.scheduler, self.device,
                                        iterations=cfg.epochs * len(self.train_loader))

        self.state = TrainState()
        self.checkpoint_epoch = 0  # the epoch of the last checkpoint written or resumed: where a restart continues
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl")
        self.progress = Progress(cfg.progress if self.is_main else "silent")

    def _check_capture(self, cfg: TrainerConfig, step: TrainingStep, data: DataSpec) -> None:
        """Refuse trainer.capture settings that cannot hold, naming why."""
        if cfg.capture == "step_only":
            return
        prefix = f"trainer.capture={cfg.capture}"
        if self.world_size > 1:
            raise ConfigError(f"{prefix} runs in one process; data-parallel training uses trainer.capture=step_only")
        if data.augment.mirror_batch:
            raise ConfigError(f"{prefix} cannot apply the augmentation inside the step when the loader appends "
                              "mirrored copies after it (dataset augment.mirror_batch); use trainer.capture=step_only")
        if cfg.capture == "whole_step" and self.amp == "fp16":
            raise ConfigError(f"{prefix} cannot use trainer.amp=fp16: GradScaler checks for overflow on the host "
                              "at every step; use amp=bf16 or none")
        if cfg.capture == "whole_step" and step.compile_refusal:
            raise ConfigError(f"{prefix} needs a step that can be captured; {type(step).__name__}: {step.compile_refusal}")

    def eval_loader(self, split: str):
        """The un-augmented loader of a data split ("train", "val" or "test"), built once."""
        if split not in self._eval_loaders:
            data = getattr(self.data, split)
            if data is None:
                raise ValueError(f"{self.data.name} has no {split} split")
            if len(data) < self.world_size:  # an empty shard would leave the other ranks waiting in the gather
                raise ConfigError(f"the {split} split of {self.data.name} has {len(data)} image(s), fewer than the "
                                  f"{self.world_size} processes: each needs at least one")
            self._eval_loaders[split] = build_loader(self.data, data, False, self.cfg.eval_batch_size, **self.loader_args)
        return self._eval_loaders[split]

    # ---------------------------------------------------------------- checkpoints
    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "last.pt"

    # best_val.pt changes only once a checkpoint records its epoch (state.best_val): the weights of a
    # newly selected epoch wait in best_val.pending.pt until then, so after a crash best_val.pt is
    # never ahead of last.pt, and `_settle_best_val` repairs the one gap (a crash between the two).
    @property
    def best_val_weights(self) -> Path:
        return self.run_dir / "best_val.pt"

    @property
    def _pending_best_val(self) -> Path:
        return self.run_dir / "best_val.pending.pt"

    def _promote_best_val(self) -> None:
        if self._pending_best_val.exists():
            os.replace(self._pending_best_val, self.best_val_weights)

    def _settle_best_val(self) -> None:
        """Before training continues: a pending best-validation file holds either the epoch the
        checkpoint selected (the crash came before its promotion: promote it) or a later epoch that
        will run again (drop it)."""
        if not self.is_main or not self._pending_best_val.exists():
            return
        selected = (self.state.best_val or {}).get("epoch")
        if selected is not None and load_checkpoint(self._pending_best_val)["epoch"] == selected:
            self._promote_best_val()
        else:
            self._pending_best_val.unlink()

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        atomic_save({
            "format": CHECKPOINT_FORMAT,
            "config_signature": self.config_signature,
            "seed": self.seed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "criterion": self.criterion.state_dict(),
            "rng": capture_rng_state(self.device),
            "step_rng": self.training_step.rng_state(),
            "state": vars(self.state),
        }, self.last_checkpoint)
        self.checkpoint_epoch = self.state.epoch  # at once: an interruption names the epoch last.pt holds
        self._promote_best_val()

    def resume(self, path: str | Path) -> None:
        # On the CPU: generator states must be restored from CPU tensors. The model and optimizer
        # loads copy their tensors to the parameters' device; the criterion's extra state (the
        # truncated loss's per-sample weights) is assigned as loaded, so it moves here first.
        ckpt = load_checkpoint(path, map_location="cpu")
        if ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
            raise CheckpointError(f"{path} is not a resumable training checkpoint of this project")
        if self.config_signature is not None and ckpt.get("config_signature") != self.config_signature:
            raise CheckpointError(f"{path} was written by a run with a different configuration; "
                                  "resuming it would mix two experiments (use another run dir or force=true)")
        if ckpt.get("seed") != self.seed:
            raise CheckpointError(f"{path} was written by a run with seed {ckpt.get('seed')}, this run has seed "
                                  f"{self.seed}: its batches would differ from the interrupted run's")
        load_model_state(self.model, ckpt["model"], str(path))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.criterion.load_state_dict(tensors_to(ckpt["criterion"], self.device))
            restore_rng_state(ckpt["rng"], self.device)
            self.training_step.load_rng_state(ckpt["step_rng"])
            self.state = TrainState(**ckpt["state"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: training state does not fit this run ({type(exc).__name__}: {exc})") from exc
        # Iterations per epoch depend on the world size: continue from this epoch's first iteration.
        set_iteration(self.scheduler, self.state.epoch * len(self.train_loader))
        if self.whole_step is not None:  # new optimizer state tensors: record anew
            self.whole_step.reset()
        self.checkpoint_epoch = self.state.epoch
        if self.is_main:
            self.metrics.truncate_after(self.state.epoch)

    def load_weights(self, path: str | Path) -> dict:
        """The model's weights from a checkpoint; returns the checkpoint (its epoch, for the record)."""
        ckpt = load_checkpoint(path, map_location=self.device)
        load_model_state(self.model, ckpt["model"], str(path))
        return ckpt

    # ---------------------------------------------------------------- training
    def _check_finite(self, bad_step: torch.Tensor) -> None:
        """Stop at the first step whose loss was not finite. All ranks check at the same steps and
        agree on the earliest bad step of any rank, so all stop together (a rank that went on would
        wait forever in the next gradient all-reduce)."""
        if self.world_size > 1:
            first = torch.where(bad_step < 0, NO_BAD_STEP, bad_step)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
            step = int(first)
            step = -1 if step == NO_BAD_STEP else step
        else:
            step = int(bad_step)
        if step >= 0:
            kept = (f"the last good checkpoint is {self.last_checkpoint}"
                    if self.last_checkpoint.exists() else "no checkpoint had been written yet")
            raise NonFiniteLossError(step, f"the training loss became NaN/inf at step {step} (epoch {self.state.epoch + 1}); "
                                     f"stopped without saving, {kept}")

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict:
        """One optimisation step on a loader batch; returns the step's parts (on the device)."""
        inputs = (x, y, index) if self.deferred is None else (x, y, index, self.deferred.take())
        if self.whole_step is not None:
            return self.whole_step(*inputs)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        parts = self.step(*inputs)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return parts

    def _run_steps(self, batches: Iterator, steps: int) -> dict:
        """`steps` optimisation steps over `batches`: the mean of every part the step returns
        (`train_<part>`), timing, and the learning rate of the first step (`lr`) and of the last
        (`lr_last`), from parameter group 0."""
        self.model.train()
        first_iteration = self.scheduler.last_epoch  # the iteration the first step runs (host scheduler in sync)
        sums, keys, seen, since_sync = None, None, 0, 0
        bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        step_no = torch.full((), self.state.global_step, dtype=torch.int64, device=self.device)
        start = time.perf_counter()
        for x, y, index in itertools.islice(batches, steps):
            parts = self._train_step(x, y, index)
            loss = parts["loss"]
            keys = keys or list(parts)
            batch = torch.stack([parts[k].detach().float() for k in keys]) * y.shape[0]
            sums = batch if sums is None else sums + batch
            step_no += 1
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step_no, bad_step)
            seen += y.shape[0]
            since_sync += 1
            self.state.global_step += 1
            if since_sync == self.cfg.log_every:
                self._check_finite(bad_step)
                self.progress.update(since_sync, float(sums[0]) / seen)
                since_sync = 0
        self._check_finite(bad_step)
        if self.whole_step is not None:
            self.whole_step.sync()
        if self.world_size > 1:  # means over every process's samples
            totals = torch.cat([sums, torch.tensor([float(seen)], device=sums.device)])
            torch.distributed.all_reduce(totals)
            sums, seen = totals[:-1], int(totals[-1].item())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        means = (sums / seen).tolist()
        record = {f"train_{k}": v for k, v in zip(keys, means)}
        record.update(epoch_time_s=seconds, images_per_s=seen / seconds,
                      lr=scheduled_lrs(self.scheduler, first_iteration)[0],
                      lr_last=scheduled_lrs(self.scheduler, self.scheduler.last_epoch - 1)[0])
        return record

    def _train_epoch(self, epoch: int) -> dict:
        self.progress.start_epoch(epoch, self.cfg.epochs, len(self.train_loader))
        self.train_loader.set_epoch(epoch)
        return self._run_steps(iter(self.train_loader), len(self.train_loader))

    def train_steps(self, steps: int) -> dict:
        """Exactly `steps` training steps, continuing one stream of batches across calls and across
        the loader's epochs, with no evaluation, checkpoint or log line (benchmarks, smoke runs)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self._stream is None:
            self._stream = self._endless_batches()
        return self._run_steps(self._stream, steps)

    def _endless_batches(self) -> Iterator:
        while True:
            self._stream_epoch += 1
            self.train_loader.set_epoch(self._stream_epoch)
            yield from self.train_loader

    def close(self) -> None:
        """End the batch stream of `train_steps` now (a DataLoader's worker processes with it)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def predict(self, split: str) -> tuple:
        """(None, logits, labels) of the current model over a whole split ("train", "val", "test") in
        its stored order, without augmentation (e.g. the training set, for the truncated loss's weights)."""
        broadcast_buffers(self.model)
        return predict(self.model, self.eval_loader(split), self.autocast, keep_features=False)

    def evaluate_all(self) -> dict:
        """Every evaluator's metrics of the current model. Data-parallel evaluators shard the data,
        so every rank first takes rank 0's buffers: one model (the one `last.pt` saves) is evaluated."""
        broadcast_buffers(self.model)
        out = {}
        for evaluator in self.evaluators.values():
            out.update(evaluator(self))
        return out

    def _update_selection(self, epoch: int, evaluation: dict) -> None:
        test = {k: v for k, v in evaluation.items() if k.startswith("test_")}
        self.state.last_eval = {"epoch": epoch, **evaluation}
        if "val_top1" in evaluation and (self.state.best_val is None or evaluation["val_top1"] > self.state.best_val["val_top1"]):
            self.state.best_val = {"epoch": epoch, "val_top1": evaluation["val_top1"], **test}
            if self.is_main:
                atomic_save({"model": self.model.state_dict(), "epoch": epoch}, self._pending_best_val)
        after = self.cfg.test_selection_after_epoch
        if after is not None and epoch > after and "test_top1" in evaluation and (
                self.state.best_test is None or evaluation["test_top1"] > self.state.best_test["test_top1"]):
            self.state.best_test = {"epoch": epoch, **test}

    def fit(self) -> dict:
        """Train from `state.epoch` to `cfg.epochs`; return the summary for results.json."""
        # metrics.jsonl holds exactly the checkpointed epochs: lines a crash left after the last
        # checkpoint (or before the first one) are dropped, never duplicated.
        if self.is_main:
            self.metrics.truncate_after(self.state.epoch)
        self._settle_best_val()
        first_epoch_of_process = True
        # Per-epoch state of any part of the step (e.g. the truncated loss's weights).
        hooks = [m.before_epoch for m in self.training_step.modules() if callable(getattr(m, "before_epoch", None))]
        for epoch in range(self.state.epoch + 1, self.cfg.epochs + 1):
            extra = {}
            for hook in hooks:
                extra.update(hook(epoch, self))
            if hooks and self.whole_step is not None:  # a hook may have replaced a tensor the graph reads
                self.whole_step.drop_graphs()
            record = {"epoch": epoch, **self._train_epoch(epoch), **extra}
            if first_epoch_of_process:
                self.state.warmup_epoch_s.append(record["epoch_time_s"])
            else:
                self.state.images_per_s.append(record["images_per_s"])
            record["warmup"] = first_epoch_of_process
            first_epoch_of_process = False
            if epoch % self.cfg.eval_every == 0 or epoch == self.cfg.epochs:
                evaluation = self.evaluate_all()
                record.update(evaluation)
                self._update_selection(epoch, evaluation)
            self.state.epoch = epoch
            self.state.elapsed_s += record["epoch_time_s"]
            if self.is_main:
                self.metrics.write(record)
                for logger in self.loggers:
                    logger.log(record, step=epoch)
            if epoch % self.cfg.ckpt_every == 0 or epoch == self.cfg.epochs:
                self.save_checkpoint()
            self.progress.end_epoch(self._epoch_line(record))
            for callback in self.callbacks:
                callback(self, epoch, record)
        return self.summary()

    def _epoch_line(self, r: dict) -> str:
        """The epoch's headline numbers: the mean loss, each accuracy the step and the evaluators
        reported (a key ending in top1 or acc, and test_top5; the step's first, then test, then the
        rest), the first step's LR and the throughput. metrics.jsonl has everything."""
        def accuracies(keys) -> list[str]:
            return [f"{EPOCH_LINE_NAMES.get(k, k)} {r[k]:.2f}" for k in keys
                    if (k in EPOCH_LINE_NAMES or k.endswith(("top1", "_acc")))
                    and isinstance(r[k], (int, float)) and not isinstance(r[k], bool)]

        train = [k for k in r if k.startswith("train_")]
        evaluated = sorted((k for k in r if k not in train), key=lambda k: not k.startswith("test_"))
        return "  ".join([f"epoch {r['epoch']}/{self.cfg.epochs}", f"loss {r['train_loss']:.4f}", *accuracies(train),
                          f"lr {r['lr']:.4g}", f"{r['images_per_s']:.0f} img/s", *accuracies(evaluated)])

    def summary(self) -> dict:
        """Test metrics under each selection protocol, all with the same keys (top1, top5, ...)."""
        s = self.state

        def test_metrics(evaluation: dict | None, **extra) -> dict | None:
            if evaluation is None:
                return None
            test = {k[len("test_"):]: v for k, v in evaluation.items() if k.startswith("test_")}
            return {"epoch": evaluation["epoch"], **extra, **test}

        return {
            "final_epoch_test": test_metrics(s.last_eval),
            "best_val_selected_test": test_metrics(s.best_val, val_top1=(s.best_val or {}).get("val_top1")),
            "authors_best_on_test": test_metrics(s.best_test, after_epoch=self.cfg.test_selection_after_epoch),
            "epochs": s.epoch,
            "train_images_per_s": statistics.median(s.images_per_s) if s.images_per_s else None,
            "warmup_epoch_s": s.warmup_epoch_s,
            "train_time_s": s.elapsed_s,
        }
