"""Evaluation: predictions of a model on one split, its top-1 / top-5 accuracy and feature geometry,
and the evaluator objects the Trainer calls.

An evaluator is any callable `evaluator(trainer) -> {"<split>_<metric>": value}`; the Trainer calls
each configured evaluator at every evaluation epoch and merges their metrics. It reads the model,
precision context and loaders through the Trainer's public attributes (`model`, `autocast`,
`eval_loader(name)`, `data`, `device`, `seed`). `val_top1`, when an evaluator reports it, is the
metric the best-validation protocol selects on; `test_*` metrics are what the protocols report.
"""

import contextlib

import torch
import torch.nn.functional as F

from opl.engine.distributed import all_gather_rows, world
from opl.eval.geometry import feature_geometry


@torch.no_grad()
def predict(model: torch.nn.Module, loader, autocast=contextlib.nullcontext, keep_features: bool = True):
    """(features or None, float logits, labels) of the whole split in its stored order, on the
    loader's device. In a data-parallel run each process predicts its shard and every process
    receives the whole split, so metrics are exact and identical on all ranks."""
    was_training = model.training
    model.eval()
    features, logits, labels, index = [], [], [], []
    for x, y, i in loader:
        with autocast():
            f, out = model(x)
        logits.append(out.float())
        labels.append(y)
        index.append(i)
        if keep_features:
            features.append(f.float())
    model.train(was_training)
    parts = [torch.cat(logits), torch.cat(labels), torch.cat(index)] + ([torch.cat(features)] if keep_features else [])
    if world()[1] > 1:
        parts = [all_gather_rows(t) for t in parts]
        order = parts[2].argsort()
        parts = [t[order] for t in parts]
    return (parts[3] if keep_features else None), parts[0], parts[1]


def evaluate(model: torch.nn.Module, loader, autocast=contextlib.nullcontext, geometry: bool = True,
             groups: tuple[torch.Tensor, tuple[str, ...]] | None = None) -> dict[str, float]:
    """Accuracies in percent; the mean cross-entropy; geometry over the whole split if asked; with
    `groups` = (group id per sample in the split's order, group names), top-1 per group as
    `<name>_top1` (e.g. per source domain)."""
    features, logits, labels = predict(model, loader, autocast, keep_features=geometry)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    count = labels.shape[0]
    metrics = {
        "top1": 100.0 * hits[:, 0].sum().item() / count,
        "top5": 100.0 * hits.any(dim=1).sum().item() / count,
        "loss": F.cross_entropy(logits.double(), labels, reduction="sum").item() / count,
    }
    if geometry:
        metrics.update(feature_geometry(features, labels))
    if groups is not None:
        ids, names = groups
        ids = torch.as_tensor(ids, device=hits.device)
        for group, name in enumerate(names):
            members = ids == group
            metrics[f"{name}_top1"] = 100.0 * hits[members, 0].sum().item() / max(1, members.sum().item())
    return metrics


def split_groups(split) -> tuple[torch.Tensor, tuple[str, ...]] | None:
    """(group id per sample, names) of a split that records them (e.g. PACS's source domains)."""
    if getattr(split, "domains", None) is None or len(split.domain_names) < 2:
        return None
    return torch.as_tensor(split.domains), tuple(split.domain_names)


class ClassificationEvaluator:
    """Top-1/top-5 and loss on the validation split (when there is one) and the test split, plus the
    test set's feature geometry (the paper's same-/different-class cosine figure) if asked, and the
    top-1 per domain of a split that records its samples' domains (`val_<domain>_top1`)."""

    def __init__(self, geometry: bool = True):
        self.geometry = bool(geometry)

    def __call__(self, trainer) -> dict:
        out = {}
        for split in ("val", "test"):
            if getattr(trainer.data, split) is None:
                continue
            metrics = evaluate(trainer.model, trainer.eval_loader(split), trainer.autocast,
                               geometry=self.geometry and split == "test", groups=split_groups(getattr(trainer.data, split)))
            out.update({f"{split}_{k}": v for k, v in metrics.items()})
        return out
