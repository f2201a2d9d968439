"""Top-1 / top-5 accuracy and feature geometry of a model on one split."""

import contextlib

import torch
import torch.nn.functional as F

from opl.eval.geometry import feature_geometry


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, autocast=contextlib.nullcontext, geometry: bool = True) -> dict[str, float]:
    """Accuracies in percent; the mean cross-entropy; geometry over the whole split if asked."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    correct1 = correct5 = loss_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    for x, y in loader:
        with autocast():
            f, logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct1 = correct1.to(hits.device) + hits[:, 0].sum()
        correct5 = correct5.to(hits.device) + hits.any(dim=1).sum()
        loss_sum = loss_sum.to(hits.device) + F.cross_entropy(logits, y, reduction="sum").double()
        count += y.shape[0]
        if geometry:
            features.append(f.float())
            labels.append(y)
    model.train(was_training)
    metrics = {
        "top1": 100.0 * correct1.item() / count,
        "top5": 100.0 * correct5.item() / count,
        "loss": loss_sum.item() / count,
    }
    if geometry:
        metrics.update(feature_geometry(torch.cat(features), torch.cat(labels)))
    return metrics
