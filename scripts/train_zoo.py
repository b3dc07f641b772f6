"""Train the shipped zoo models on the digits training split and save their weights.

    python scripts/train_zoo.py          # writes python/rapidquant/zoo/weights/*.pt

Deterministic for the fixed seed with one thread (about half a minute on 2 cores).
"""
import os

import torch

from rapidquant.zoo import digits

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "rapidquant", "zoo", "weights")

if __name__ == "__main__":
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    for name, cls in digits.MODELS.items():
        model = digits.train(getattr(digits, cls)(), epochs=15, seed=0)
        path = os.path.join(OUT, f"{name}.pt")
        torch.save(model.state_dict(), path)
        print(f"{name}: test accuracy {digits.accuracy(model):.4f}, {os.path.getsize(path) // 1024} KiB -> {path}")
