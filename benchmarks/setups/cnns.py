"""Convolutional nets from the papers, thin enough for a CPU, on the 8×8 digits as (B, 1, 8, 8) images.

- Simonyan & Zisserman (2015), "Very deep convolutional networks", Table 1
  configuration D (VGG-16: 13 conv 3×3 layers in 5 stages, 3 fully
  connected), with torchvision's ``models/vgg.py`` init (conv: Kaiming
  normal, fan_out; linear: N(0, 0.01); biases 0) and the paper's SGD with
  momentum 0.9; with and without BatchNorm (torchvision's ``vgg16_bn``).
  Only the first three stages pool (8 → 4 → 2 → 1 pixels); widths ÷ 8.
- He, Zhang, Ren & Sun (2016), "Deep residual learning", §4.2 (CIFAR):
  6n + 2 layers in three stages of 2n 3×3 convs with BatchNorm, with or
  without identity shortcuts (n = 9: the plain-56 net and ResNet-56), widths
  4/8/16 instead of 16/32/64; and Table 1's ResNet-18 (four stages of two
  basic blocks), widths 8/16/32/64.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import BenchSetup, Trial, digits_trial


def _torchvision_init(model: nn.Module) -> nn.Module:
    """torchvision's VGG/ResNet init: conv Kaiming normal (fan_out, relu), BN weight 1 bias 0, linear N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def vgg16(batch_norm: bool) -> nn.Sequential:
    """Configuration D at widths 8-16-32-32-32: [2, 2, 3, 3, 3] convs per stage, pooling after stages 1–3.

    As in the usual CIFAR port of VGG-16, one linear layer classifies (the three 4096-wide ones are for ImageNet).
    """
    stages = [(8, 2), (16, 2), (32, 3), (32, 3), (32, 3)]
    layers: list[nn.Module] = []
    c_in = 1
    for i, (c, n) in enumerate(stages):
        for _ in range(n):
            layers.append(nn.Conv2d(c_in, c, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU(inplace=True))
            c_in = c
        if i < 3:
            layers.append(nn.MaxPool2d(2))  # (B, c, 8/2^(i+1), …)
    layers += [nn.Flatten(), nn.Linear(32, 10)]  # the CIFAR variant's single classifier layer (B, 32) → (B, 10)
    return nn.Sequential(*layers)


def vgg16_plain(seed: int) -> Trial:
    """VGG-16 without BatchNorm, torchvision's init, SGD 0.05 with momentum 0.9: the ReLUs die and the net stalls.

    Simonyan & Zisserman §3.1 trained configuration A first and initialised the deeper nets from it, because
    "bad initialisation can stall learning due to the instability of gradient in deep nets"; here it does.
    """
    torch.manual_seed(seed)
    model = _torchvision_init(vgg16(batch_norm=False))
    return digits_trial(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), seed, image=True)


def vgg16_bn(seed: int) -> Trial:
    """VGG-16 with BatchNorm after every conv, torchvision's init, SGD 0.01 with momentum 0.9: it trains."""
    torch.manual_seed(seed)
    model = _torchvision_init(vgg16(batch_norm=True))
    return digits_trial(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), seed, image=True)


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN layers, ReLU between and after; with ``shortcut`` an identity (or 1×1 projection) is added."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = shortcut
        self.proj = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                     if shortcut and (stride != 1 or c_in != c_out) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.shortcut:
            out = out + (self.proj(x) if self.proj is not None else x)
        return torch.relu(out)


class CifarNet(nn.Module):
    """He et al. 2016 §4.2: stem conv, stages of ``n`` blocks at ``widths`` (stride 2 between), pool, fc."""

    def __init__(self, n: int, widths: tuple[int, ...], shortcut: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for i, c in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(c_in, c, 2 if (i > 0 and j == 0) else 1, shortcut))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))  # global average pooling: (B, C)


def _cifar_trial(model: nn.Module, seed: int, lr: float = 0.1, batch: int = 64) -> Trial:
    torch.manual_seed(seed)
    _torchvision_init(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)  # §4.2's recipe
    return digits_trial(model, opt, seed, image=True, batch=batch)


def plain56(seed: int) -> Trial:
    """He et al. 2016 §4.2: the plain 56-layer net (BN, no shortcuts), SGD 0.01, batches of 32."""
    torch.manual_seed(seed)
    return _cifar_trial(CifarNet(9, (4, 8, 16), shortcut=False), seed, lr=0.01, batch=32)


def resnet56(seed: int) -> Trial:
    """He et al. 2016 §4.2: ResNet-56 (the same net with identity shortcuts), SGD 0.1, batches of 64."""
    torch.manual_seed(seed)
    return _cifar_trial(CifarNet(9, (4, 8, 16), shortcut=True), seed)


def resnet18(seed: int) -> Trial:
    """He et al. 2016 Table 1, ResNet-18 (2 basic blocks in each of 4 stages), widths 8–64, SGD 0.1."""
    torch.manual_seed(seed)
    return _cifar_trial(CifarNet(2, (8, 16, 32, 64), shortcut=True), seed)


_VGG = "Simonyan & Zisserman 2015, Table 1 (D); torchvision models/vgg.py init"
_HE = "He et al. 2016, CVPR, "
SETUPS = [
    BenchSetup("vgg16", "vanishing", 200, vgg16_plain, _VGG, slow=True),
    BenchSetup("vgg16_bn", "healthy", 200, vgg16_bn, _VGG + " (vgg16_bn)", slow=True),
    BenchSetup("resnet56", "healthy", 150, resnet56, _HE + "§4.2, Fig. 6 (ResNet-56)", slow=True),
    BenchSetup("resnet18", "healthy", 150, resnet18, _HE + "Table 1 (18-layer)", slow=True),
]
