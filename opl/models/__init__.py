from opl.models.cifar_resnet import CifarResNet, resnet18_cifar, resnet20, resnet32, resnet44, resnet56, resnet110
from opl.models.mlp import MLP

__all__ = ["CifarResNet", "MLP", "resnet18_cifar", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
