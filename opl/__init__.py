"""Orthogonal Projection Loss (Ranasinghe et al., ICCV 2021): loss, models, data and trainer.

The library is importable without Hydra; `train.py` and `configs/` wire it together.
"""

__version__ = "0.1.0"
