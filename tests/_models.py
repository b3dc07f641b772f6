"""Small models for the QuantSim tests (made here; nothing is downloaded)."""
import torch
import torch.nn.functional as F
from torch import nn

from rapidquant.zoo.digits import InvertedResidual


class ConvNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class MobileNetV2ish(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 2), InvertedResidual(16, 24, 2, 3),
                                    InvertedResidual(24, 24, 1, 3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(24, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class TinyEncoder(nn.Module):
    """Embedding + one transformer block written with LayerNorm, MultiheadAttention, GELU,
    plus a hand-written attention head (matmul/softmax functional ops)."""

    def __init__(self, vocab=50, d=32, heads=4, num_classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff1, self.act, self.ff2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, num_classes)

    def forward(self, tokens):
        x = self.emb(tokens)
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        x = x + self.ff2(self.act(self.ff1(self.ln2(x))))
        scores = torch.matmul(self.q(x), self.k(x).transpose(1, 2)) / 8.0
        x = torch.matmul(F.softmax(scores, dim=-1), x)
        return self.out(x.mean(dim=1))


class Prototypes(nn.Module):
    """Distance to learned prototypes: torch.cdist reads a weight matrix no quantizer reaches."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.centers = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return -torch.cdist(self.fc(x), self.centers)


def output_fidelity(model, batches):
    """An eval_fn for AutoQuant tests: 1 - the relative error energy of a model's outputs
    against ``model``'s own on ``batches`` (1.0 for the float model itself)."""
    with torch.no_grad():
        refs = [model(x) for x in batches]

    def fidelity(m):
        with torch.no_grad():
            return 1 - sum(float((r - m(x)).pow(2).sum()) for r, x in zip(refs, batches)) / \
                sum(float(r.pow(2).sum()) for r in refs)
    return fidelity
