"""MART: Misclassification Aware adveRsarial Training (Wang et al., ICLR 2020), the formula of the
authors' public code (`mart_loss` in YisenWang/MART), with every logit cast to float32:

    p_adv = softmax(logits_adv),  p_nat = softmax(logits_clean)
    y'    = the most likely WRONG class under p_adv (second-highest when the top one is the label)
    mart_adv    = CE(logits_adv, y) + NLL(log(1.0001 - p_adv + 1e-12), y')      (boosted CE)
    mart_robust = mean_i [ KL(p_nat_i || p_adv_i) * (1.0000001 - p_nat_i[y_i]) ]  (KL weighted by
                  how badly the clean input is classified)
    loss        = mart_adv + beta * mart_robust   (MART's scripts: beta 5 for ResNet-18, 6 for WRN-34-10)

The KL term keeps gradients through BOTH branches, as in the authors' code.
"""

import torch
import torch.nn.functional as F


def mart_loss(logits_adv: torch.Tensor, logits_clean: torch.Tensor, labels: torch.Tensor,
              beta: float = 6.0) -> dict[str, torch.Tensor]:
    if not beta >= 0:
        raise ValueError(f"MART beta must be >= 0, got {beta}")
    logits_adv, logits_clean = logits_adv.float(), logits_clean.float()
    batch = logits_adv.shape[0]

    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
    # The constants 1.0001, 1e-12 and 1.0000001 are the authors' (they keep the logs finite).
    mart_adv = F.cross_entropy(logits_adv, labels) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)

    nat_probs = F.softmax(logits_clean, dim=1)
    true_probs = nat_probs.gather(1, labels[:, None]).squeeze(1)  # squeeze(1): safe for batch 1
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    mart_robust = (kl * (1.0000001 - true_probs)).sum() / batch

    return {"loss": mart_adv + float(beta) * mart_robust, "mart_adv": mart_adv, "mart_robust": mart_robust}
