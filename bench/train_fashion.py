"""Train the zoo's ResNet- and MobileNetV2-style CNNs on Fashion-MNIST for the suite.

    python bench/train_fashion.py      # writes bench/weights/fashion_{resnet,mobilenet}.pt

Needs the Debian package dataset-fashion-mnist. Deterministic for the seed with one thread
(a few minutes per model on one core). The weights stay in bench/, out of the package.
"""
import os
import time

import torch

from rapidquant.zoo import digits, fashion

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MODELS = {"fashion_resnet": digits.DigitsResNet, "fashion_mobilenet": digits.DigitsMobileNet}


def load(name: str) -> torch.nn.Module:
    path = os.path.join(OUT, f"{name}.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; run python bench/train_fashion.py to create it")
    model = MODELS[name]()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    train, _ = fashion.splits()
    # The last 512 training images are the suite's calibration data; training skips them.
    data = (train[0][:-512], train[1][:-512])
    for name, cls in MODELS.items():
        t0 = time.perf_counter()
        model = digits.train(cls(), epochs=4, lr=4e-3, seed=0, data=data, batch_size=128)
        path = os.path.join(OUT, f"{name}.pt")
        if os.path.exists(path) and os.environ.get("OVERWRITE") != "1":
            path = path[:-3] + ".new.pt"  # never overwrite trained weights silently
        torch.save(model.state_dict(), path)
        print(f"{name}: test accuracy {fashion.accuracy(model):.4f} after {time.perf_counter() - t0:.0f} s "
              f"-> {path}", flush=True)
