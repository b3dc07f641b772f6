"""Digits (1797 handwritten 8x8 images, the UCI set that scikit-learn ships, CC BY 4.0;
a copy lives in zoo/data/digits.pt) upsampled to 16x16, and two small CNNs: a
ResNet-style net (BasicBlocks, residual adds) and a MobileNetV2-style net (inverted
residuals, depthwise 3x3, BN, ReLU6). Pretrained weights ship in zoo/weights/ (made by
scripts/train_zoo.py)."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=1)
def digits_splits(size: int = 16):
    """((x_train, y_train), (x_test, y_test)): 1400 / 397 images, normalized, 1 x size x size."""
    d = torch.load(os.path.join(_HERE, "data", "digits.pt"), weights_only=True)
    x = d["images"].float().unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.35
    y = d["labels"].long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


_HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"digits_resnet": "DigitsResNet", "digits_mobilenet": "DigitsMobileNet"}


def pretrained(name: str = "digits_mobilenet") -> nn.Module:
    """A shipped pretrained model (eval mode): "digits_mobilenet" or "digits_resnet"."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    model = globals()[MODELS[name]]()
    path = os.path.join(_HERE, "weights", f"{name}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; run scripts/train_zoo.py to create it")
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def calibration_batches(n: int = 8, batch_size: int = 32):
    (x, _), _ = digits_splits()
    return [x[i * batch_size:(i + 1) * batch_size] for i in range(min(n, len(x) // batch_size))]


def accuracy(model, split: str = "test") -> float:
    (xtr, ytr), (xte, yte) = digits_splits()
    x, y = (xte, yte) if split == "test" else (xtr, ytr)
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


class _Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + idt)


class DigitsResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = _Basic(16, 16, 1)
        self.layer2 = _Basic(16, 32, 2)
        self.layer3 = _Basic(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project (+ residual)."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class DigitsMobileNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()),
            InvertedResidual(16, 16, 1, 1), InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4), InvertedResidual(32, 32, 1, 4),
            nn.Sequential(nn.Conv2d(32, 96, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU6()))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(96, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def train(model: nn.Module, epochs: int = 15, lr: float = 3e-3, seed: int = 0, data=None,
          batch_size: int = 64) -> nn.Module:
    """Train on (x, y) (default: the digits training split) with Adam and a one-cycle
    schedule; deterministic for a seed and thread count."""
    torch.manual_seed(seed)
    x, y = data if data is not None else digits_splits()[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()
