from opl.methods.adversarial import AdversarialStep
from opl.methods.base import StandardStep, TrainingStep

__all__ = ["AdversarialStep", "StandardStep", "TrainingStep"]
