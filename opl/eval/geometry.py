"""Feature geometry of a whole split (the paper's figure): cosine similarity statistics over all
ordered pairs i != j of L2-normalised features, split into same-class and different-class pairs."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def feature_geometry(features: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> dict[str, float]:
    """Exact means over all pairs, computed block by block (N x chunk Gram slices) in float64 sums.

    Returns same_cos (mean same-class cosine), diff_abs_cos (mean different-class |cosine|) and
    diff_cos (signed mean different-class cosine).
    """
    f = F.normalize(features.float(), dim=1)
    labels = labels.to(f.device)
    n = f.shape[0]
    same_sum = diff_sum = diff_abs_sum = torch.zeros((), dtype=torch.float64, device=f.device)
    same_count = diff_count = 0
    for start in range(0, n, chunk):
        block = f[start:start + chunk] @ f.t()  # (c, N)
        same = labels[start:start + chunk, None] == labels[None, :]
        rows = torch.arange(start, start + block.shape[0], device=f.device)
        same[rows - start, rows] = False  # drop i == j
        diff = labels[start:start + chunk, None] != labels[None, :]
        block = block.double()
        same_sum = same_sum + block[same].sum()
        diff_sum = diff_sum + block[diff].sum()
        diff_abs_sum = diff_abs_sum + block[diff].abs().sum()
        same_count += int(same.sum())
        diff_count += int(diff.sum())
    nan = float("nan")
    return {
        "same_cos": same_sum.item() / same_count if same_count else nan,
        "diff_abs_cos": diff_abs_sum.item() / diff_count if diff_count else nan,
        "diff_cos": diff_sum.item() / diff_count if diff_count else nan,
    }
