"""A small CNN trained on the digits data shipped in rapidquant.zoo (real handwritten digits)."""
import functools

import torch
import torch.nn.functional as F
from torch import nn


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, stride=2)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_data():
    """The digits copy shipped in rapidquant.zoo, at its native 8x8."""
    from rapidquant.zoo.digits import digits_splits
    return digits_splits(size=8)


@functools.lru_cache(maxsize=1)
def trained_digits_net():
    torch.manual_seed(0)
    (xtr, ytr), _ = digits_data()
    m = DigitsNet()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for epoch in range(12):
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(m(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return m.eval()


def accuracy(model, x=None, y=None) -> float:
    if x is None:
        _, (x, y) = digits_data()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def calib_batches(n=8, bs=32):
    (xtr, _), _ = digits_data()
    return [xtr[i * bs:(i + 1) * bs] for i in range(n)]
