"""torchvision's ``resnet18`` written out (torchvision's CPU import fails beside torch
2.13.0+cpu, BRIEF §6): the same BasicBlock layout, BatchNorm after every convolution,
``ReLU(inplace=True)``, a 3×3 max-pool stem, adaptive average pooling and a linear
head. ``width`` scales the channel counts (torchvision: 64); ``in_channels`` and a
small ``stem_stride`` let it run on 8×8 digits."""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=stem_stride, padding=1)
        planes, inplanes = width, width
        stages = []
        for i, blocks in enumerate(layers):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(inplanes, planes * 2**i, stride)]
            inplanes = planes * 2**i
            stage += [BasicBlock(inplanes, inplanes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64, stem_stride: int = 2) -> ResNet:
    """torchvision.models.resnet18's architecture (11.7 M parameters at width 64, 3 channels)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width, stem_stride)


# --------------------------------------------------------------------------- the zoo entry

#: Every convolution (the 1×1 downsampling ones included) and the fully connected head.
NFA_LAYERS = (
    ("net.conv1",)
    + tuple(
        f"net.layer{stage}.{block}.{name}"
        for stage in range(1, 5)
        for block in range(2)
        for name in ("conv1", "conv2") + (("downsample.0",) if stage > 1 and block == 0 else ())
    )
    + ("net.fc",)
)
NFA_OPTIONS: dict = {}


def build(stochastic: bool = True, width: int = 8, batch_size: int = 32):
    """A width-8 resnet18 on the digits as 1×8×8 images (stem stride 1), SGD with momentum 0.9
    and weight decay 5e-4: ``(module, loader)``. It has no stochastic layers (``stochastic``
    is accepted for a uniform interface); BatchNorm trains in batch-statistics mode."""
    import torch

    from models import Classifier

    from .common import MODEL_SEED, digit_images, shuffled_loader

    torch.manual_seed(MODEL_SEED)
    net = resnet18(num_classes=10, in_channels=1, width=width, stem_stride=1)
    module = Classifier(net, "sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    return module, shuffled_loader(digit_images(), batch_size)
