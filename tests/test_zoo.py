"""The zoo's real-model loaders: MobileNetV2 fidelity crops, MiniLM (architecture checked
with random weights, so no package is needed), Fashion-MNIST's idx reader."""
import gzip
import struct
import warnings

import pytest
import torch

import rapidquant as rq
from rapidquant.zoo import fashion, imagenet, minilm


def test_fidelity_crops_are_deterministic_normalized_and_split_by_half():
    a = imagenet.fidelity_crops(6, "calibration")
    assert a.shape == (6, 3, 224, 224) and torch.isfinite(a).all()
    assert torch.equal(a, imagenet.fidelity_crops.__wrapped__(6, "calibration"))
    b = imagenet.fidelity_crops(6, "evaluation")
    assert not torch.equal(a, b)
    assert any(p.endswith("grace_hopper.jpg") for p in imagenet.photo_paths())


def test_mobilenet_v2_has_torchvision_names():
    names = dict(imagenet.MobileNetV2().named_parameters())
    assert "features.1.conv.0.0.weight" in names and "classifier.1.weight" in names
    assert sum(p.numel() for p in names.values()) == 3_504_872  # torchvision's count


def _tiny_minilm():
    torch.manual_seed(0)
    return minilm.MiniLM(vocab=50, hidden=32, layers=2, heads=4, ffn=64, max_pos=16).eval()


def test_minilm_padding_does_not_change_real_tokens():
    m = _tiny_minilm()
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1.0, 1, 1, 0, 0]])
    with torch.no_grad():
        padded = m(ids, mask)[:, :3]
        alone = m(ids[:, :3], mask[:, :3])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_minilm_quantsim_captures_every_op_without_unknowns():
    m = _tiny_minilm()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown-op warning would fail here
        sim = rq.QuantSim(m, (ids, mask), rq.QuantSimConfig(param_bw=8, act_bw=16))
    names = list(sim.activation_quantizers())
    for part in ("LayerNorm", "intermediate_act_fn", "softmax", "query"):
        assert any(part in n for n in names), part
    sim.compute_encodings([(ids, mask)], show_progress=False)
    with torch.no_grad():
        ref, out = m(ids, mask), sim.model(ids, mask)
    assert 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()) > 30  # W8A16: close to float


def test_docstring_pairs_and_recall():
    pairs = minilm.docstring_pairs()
    assert len(pairs) > 100 and all(len(s) >= 20 and len(b) >= 80 for s, b in pairs)
    e = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    assert minilm.retrieval_recall(e, e) == 1.0


def _write_idx(path, arr, dims):
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(arr))


def test_fashion_idx_reader(tmp_path):
    for part, n in (("train", 4), ("t10k", 3)):
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", [i % 256 for i in range(n * 28 * 28)], (n, 28, 28))
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", list(range(n)), (n,))
    (xtr, ytr), (xte, yte) = fashion.splits.__wrapped__(str(tmp_path))
    assert xtr.shape == (4, 1, 28, 28) and yte.tolist() == [0, 1, 2]
    assert xtr[0, 0, 0, 1].item() == pytest.approx((1 / 255 - fashion.MEAN) / fashion.STD)


def test_fashion_missing_data_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion.splits.__wrapped__(str(tmp_path))
