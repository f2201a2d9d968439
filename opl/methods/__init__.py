"""Training methods as step objects the one Trainer runs (opl/methods/base.py), and their own
computations, free of the trainer (e.g. RSC's feature muting)."""

from opl.methods.adversarial import AdversarialStep
from opl.methods.base import StandardStep, TrainingStep
from opl.methods.rsc import RSCStep

__all__ = ["AdversarialStep", "RSCStep", "StandardStep", "TrainingStep"]
