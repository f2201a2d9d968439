from opl.models.cifar_resnet import CifarResNet, resnet18_cifar, resnet20, resnet32, resnet44, resnet56, resnet110
from opl.models.mlp import MLP
from opl.models.resnet12 import ResNet12, resnet12
from opl.models.timm_backbones import TimmBackbone
from opl.models.wide_resnet import WideResNet, wide_resnet, wrn34_10

__all__ = ["CifarResNet", "MLP", "ResNet12", "TimmBackbone", "resnet12", "resnet18_cifar", "resnet20", "resnet32",
           "resnet44", "resnet56", "resnet110", "WideResNet", "wide_resnet", "wrn34_10"]
