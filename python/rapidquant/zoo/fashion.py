"""Fashion-MNIST (60k train / 10k test, 28x28, 10 classes) read from the Debian package
`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist); nothing is downloaded."""
from __future__ import annotations

import functools
import gzip
import os

import numpy as np
import torch

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.286, 0.353
INSTALL_HINT = "Fashion-MNIST comes from a Debian package: apt-get install dataset-fashion-mnist"


def available(data_dir: str = DATA_DIR) -> bool:
    return os.path.exists(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"))


def _idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=1)
def splits(data_dir: str = DATA_DIR):
    """((x_train, y_train), (x_test, y_test)), x normalized float32 N x 1 x 28 x 28."""
    if not available(data_dir):
        raise FileNotFoundError(f"{data_dir} has no Fashion-MNIST files. {INSTALL_HINT}")
    out = []
    for part in ("train", "t10k"):
        x = _idx(os.path.join(data_dir, f"{part}-images-idx3-ubyte.gz"))
        y = _idx(os.path.join(data_dir, f"{part}-labels-idx1-ubyte.gz"))
        x = (torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1) - MEAN) / STD
        out.append((x, torch.from_numpy(y.astype(np.int64))))
    return tuple(out)


def accuracy(model, n: int | None = None, batch_size: int = 1000) -> float:
    """Top-1 accuracy on the test split (its first n images)."""
    _, (x, y) = splits()
    x, y = x[:n], y[:n]
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return (pred == y).float().mean().item()


def calibration_batches(n: int = 16, batch_size: int = 32):
    """n batches from the end of the training split (disjoint from the test split)."""
    (x, _), _ = splits()
    x = x[-n * batch_size:]
    return list(x.split(batch_size))
