from opl.losses.classification import ClassificationLoss, ce_plus_opl
from opl.losses.opl import NEG_ABS_MODES, OPLComponents, OrthogonalProjectionLoss

__all__ = ["ClassificationLoss", "ce_plus_opl", "NEG_ABS_MODES", "OPLComponents", "OrthogonalProjectionLoss"]
