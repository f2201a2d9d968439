"""A small MLP for tiny images (the scikit-learn digits demo). Returns `(features, logits)`."""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, num_classes: int, in_features: int, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        if not hidden:
            raise ValueError("MLP needs at least one hidden layer: its output is the OPL feature")
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            width = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = width
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.fc(features)
