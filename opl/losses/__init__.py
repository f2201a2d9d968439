from opl.losses.classification import ClassificationLoss, CrossEntropy, ce_plus_opl, truncated_lq
from opl.losses.opl import NEG_ABS_MODES, OPLComponents, OrthogonalProjectionLoss
from opl.losses.truncated import TruncatedLq

__all__ = ["ClassificationLoss", "CrossEntropy", "ce_plus_opl", "truncated_lq", "NEG_ABS_MODES", "OPLComponents",
           "OrthogonalProjectionLoss", "TruncatedLq"]
