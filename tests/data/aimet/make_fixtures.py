"""Writes the AIMET encodings files tests/test_aimet_encodings.py loads (not run by the tests).

Run once with aimet-torch installed (written with aimet-torch 2.42.0, torch 2.13.0):
    python tests/data/aimet/make_fixtures.py tests/data/aimet
It saves the model's weights, AIMET's legacy export (0.6.1 and 1.0.0 encodings keyed by ONNX
tensor names, the module-keyed ``_torch.encodings``, and the .onnx they name), its ``sim.onnx.export``
(2.0.0) and AIMET's simulated output on a held-out batch, which a rapidquant sim loading
those encodings must reproduce.
"""
import os
import sys

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


class Net(nn.Module):
    """conv + ReLU6, a residual block, pooling, a linear layer and a functional op after it
    (AIMET quantizes modules only: the scaled output carries no encoding)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.block = Block()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(self.act(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1)) * 0.5


def batches(n=5):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


def main(out: str) -> None:
    import aimet_torch.common.quantsim as common
    from aimet_common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    torch.manual_seed(0)
    model = Net().eval()
    *cal, held_out = batches()
    sim = QuantizationSimModel(model, dummy_input=cal[0], quant_scheme=QuantScheme.post_training_tf,
                               default_param_bw=8, default_output_bw=8)

    def forward(m, _=None):
        with torch.no_grad():
            for b in cal:
                m(b)
    sim.compute_encodings(forward, None)
    for version, folder in (("0.6.1", "v0"), ("1.0.0", "v1")):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        common.encoding_version = version
        sim.export(os.path.join(out, folder), "net", dummy_input=cal[0])
        for junk in ("net.pth", "temp_onnx_model_with_all_markers.onnx", "net_torch.encodings" if folder == "v0" else ""):
            if junk:
                os.remove(os.path.join(out, folder, junk))
    os.makedirs(os.path.join(out, "v2"), exist_ok=True)
    sim.onnx.export((cal[0],), os.path.join(out, "v2", "net.onnx"), encoding_version="2.0.0")
    with torch.no_grad():
        torch.save({"state_dict": model.state_dict(), "x": held_out, "aimet_output": sim.model(held_out).as_subclass(torch.Tensor).detach().clone()},
                   os.path.join(out, "net.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
