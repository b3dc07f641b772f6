"""Block reconstruction (BRECQ + QDrop): blocks found from the graph, the learned result
better than layer-wise AdaRound where activations are coarse, deterministic, and honest
about what it leaves alone."""
import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import rapidquant as rq
from rapidquant import zoo
from rapidquant.qmodules import QuantizedModule
from rapidquant.scoring import sqnr_db
from rapidquant.techniques import find_blocks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

W4A4 = rq.QuantSimConfig(param_bw=4, act_bw=4, per_channel=False, hw_config="default")


def _weighted(sim):
    return {n for n, m in sim.model.named_modules()
            if isinstance(m, QuantizedModule) and isinstance(m.module, (nn.Conv2d, nn.Linear))}


@pytest.fixture(scope="module")
def resnet():
    m = zoo.pretrained("digits_resnet")
    rq.fold_batch_norms_(m)
    return m


def test_blocks_follow_residual_structure(resnet):
    sim = rq.QuantSim(resnet, zoo.calibration_batches(1)[0])
    targets = _weighted(sim)
    blocks = find_blocks(sim.model, targets)
    layers = [b.layers for b in blocks if b.layers]
    # every layer in exactly one block, in execution order
    assert sorted(sum(layers, [])) == sorted(targets)
    # a residual block (with its downsample) is one block; the stem and the head stand alone
    assert layers == [["stem.0"], ["layer1.conv1", "layer1.conv2"],
                      ["layer2.down.0", "layer2.conv1", "layer2.conv2"],
                      ["layer3.down.0", "layer3.conv1", "layer3.conv2"], ["fc"]]
    # min_layers merges chain segments
    merged = [b.layers for b in find_blocks(sim.model, targets, min_layers=2) if b.layers]
    assert merged[0] == ["stem.0", "layer1.conv1", "layer1.conv2"]


def test_transformer_blocks_ignore_the_mask_path():
    """In a BertModel the attention mask stays live across every layer; it depends on no
    weight, so it does not prevent cuts: attention and MLP sub-blocks come out per layer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    m = transformers.BertModel(cfg).eval()
    sim = rq.QuantSim(m, (torch.randint(1, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)))
    layers = [b.layers for b in find_blocks(sim.model, _weighted(sim)) if b.layers]
    for i in range(2):
        p = f"encoder.layer.{i}."
        assert [p + n for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                                "attention.output.dense")] in layers
        assert any(b[:2] == [p + "intermediate.dense", p + "output.dense"] for b in layers)


def _scores(model, result, x_test, ref):
    sim = rq.QuantSim(model, zoo.calibration_batches(1)[0], W4A4)
    if result is not None:
        result.apply_to(sim)
    sim.compute_encodings(zoo.calibration_batches(16), show_progress=False)
    with torch.no_grad():
        out = sim.model(x_test)
    return sqnr_db(out, ref), sim


def test_block_reconstruction_beats_adaround_at_w4a4(resnet):
    """W4A4 per-tensor, digits ResNet, test split. Measured: nearest 6.3 dB, AdaRound 12.6 dB,
    block reconstruction (200 iterations per block) 16.1 dB at 1 thread (16.2 before the biases
    learned too); bound: AdaRound + 2 dB. The learned rounding and steps must also be what the
    sim runs."""
    x, data = zoo.calibration_batches(1)[0], zoo.calibration_batches(16)
    (_, _), (x_test, y_test) = zoo.digits_splits()
    with torch.no_grad():
        ref = resnet(x_test)
    ada = rq.adaround(resnet, x, data, rq.AdaRoundConfig(param_bw=4, per_channel=False, hw_config="default"),
                      show_progress=False, sim_config=W4A4)
    cfg = rq.BlockReconConfig(param_bw=4, per_channel=False, hw_config="default", iterations=200)
    before = copy.deepcopy(resnet.state_dict())
    res = rq.reconstruct_blocks(resnet, x, data, cfg, show_progress=False, sim_config=W4A4)
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in before.items())  # input untouched
    s_ada, _ = _scores(ada.model, ada, x_test, ref)
    s_blk, sim = _scores(res.model, res, x_test, ref)
    assert s_blk >= s_ada + 2.0, (s_blk, s_ada)
    assert [b.name for b in res.blocks][0] == "stem.0" and len(res.blocks) == 5
    for b in res.blocks:
        assert b.mse_reconstructed < b.mse_nearest and 0 < b.flipped < 0.5 and b.iterations <= 200
    # the sim holds the learned, frozen encodings: activation steps moved, weights on their grid
    acts = {k: v for k, v in res.encodings["quantizers"].items() if k not in sim.param_quantizers()}
    held = [k for k, v in acts.items() if v and sim.quantizer(k).frozen
            and v["scale"] == sim.quantizer(k).encoding["scale"]]
    assert len(held) == len(acts) >= 10
    params = sim.parameters_quantized()
    for name in res.float_weights:
        w = params[name].detach()
        assert torch.equal(sim.quantizer(name)(w), w)


def test_deterministic_and_knobs_matter(resnet):
    x, data = zoo.calibration_batches(1)[0], zoo.calibration_batches(4)
    base = rq.BlockReconConfig(param_bw=4, per_channel=False, hw_config="default", iterations=30)

    def run(**kw):
        r = rq.reconstruct_blocks(resnet, x, data, rq.BlockReconConfig(**{**base.__dict__, **kw}),
                                  show_progress=False, sim_config=W4A4)
        return r.model.state_dict(), r.encodings["quantizers"]

    w1, e1 = run(drop_prob=0.5)  # QDrop on: its random choices come from the seed too
    w2, e2 = run(drop_prob=0.5)
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and e1 == e2
    w3, e3 = run()  # QDrop off (the default): another optimization path
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)
    _, e4 = run(learn_act_steps=False)
    sim = rq.QuantSim(resnet, x, replace(W4A4, param_scheme="mse"))  # the weight scheme reconstruction uses
    sim.compute_encodings(data, show_progress=False)
    calibrated = {k: q.encoding["scale"] for k, q in sim.activation_quantizers().items()}
    assert all(e4[k]["scale"] == calibrated[k] for k in calibrated)  # steps unchanged when not learned
    assert sum(e1[k]["scale"] != calibrated[k] for k in calibrated) >= 10
    # the biases learn with the rounding (bias_lr), and stay as they were without it
    biases = [k for k, v in resnet.state_dict().items() if k.endswith("bias")]
    assert biases and all(not torch.equal(w3[k], resnet.state_dict()[k]) for k in biases)
    w5, _ = run(bias_lr=None)
    # more rows per step than one cached batch holds (32): rows of two batches, not ignored
    w6, _ = run(batch_rows=64)
    assert not all(torch.equal(w6[k], w3[k]) for k in w3)
    assert all(torch.equal(w5[k], resnet.state_dict()[k]) for k in biases)
    with pytest.raises(ValueError, match="bias_lr"):
        rq.BlockReconConfig(bias_lr=-1.0)


def test_untreated_layers_are_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 4)

        def forward(self, t):
            return self.fc(torch.relu(self.emb(t)).mean(1))

    torch.manual_seed(0)
    net = Net().eval()
    t = torch.randint(0, 10, (8, 5))
    r = rq.reconstruct_blocks(net, t, [t] * 2, rq.BlockReconConfig(iterations=10, skip=()), show_progress=False)
    names = dict(r.skipped)
    assert "emb" in names and "Embedding" in names["emb"]
    assert [b.layers for b in r.blocks] == [["fc"]]
    with pytest.raises(ValueError, match="drop_prob"):
        rq.BlockReconConfig(drop_prob=1.0)


def test_per_block_weight_grids(resnet):
    """Per-block weight grids (the reference soft rounding; the fused kernel takes none):
    learned weights land on their grid and the block error falls."""
    x, data = zoo.calibration_batches(1)[0], zoo.calibration_batches(2)
    cfg = rq.QuantSimConfig(param_bw=4, act_bw=8, block_size=8)
    r = rq.reconstruct_blocks(resnet, x, data, rq.BlockReconConfig(param_bw=4, block_size=8, iterations=40),
                              show_progress=False, sim_config=cfg)
    sim = rq.QuantSim(r.model, x, cfg)
    r.apply_to(sim)
    params = sim.parameters_quantized()
    treated = [n for n in r.float_weights if sim.quantizer(n).block_size == 8]
    assert treated
    for name in treated:
        w = params[name].detach()
        assert torch.equal(sim.quantizer(name)(w), w)
    assert all(b.mse_reconstructed <= b.mse_nearest for b in r.blocks)


@pytest.mark.parametrize("technique", ["block_reconstruction", "adaround"])
def test_a_mixed_configuration_is_learned_at_its_precisions(resnet, technique):
    """precisions_from: a sim with 8-bit first and last layers (the usual W4A4 protocol, or
    what AMP chose) in a 4-bit configuration. The rounding is learned on each layer's own
    grid, and the result loads into a sim set up the same way."""
    x, data = zoo.calibration_batches(1)[0], zoo.calibration_batches(2)

    def mixed(model):
        sim = rq.QuantSim(model, x, W4A4)
        rq.set_precision(sim, "stem.0", activation="int8", param="int8")
        rq.set_precision(sim, "fc", activation="int8", param="int8")
        return sim

    weights = dict(param_bw=4, per_channel=False, hw_config="default", iterations=30)
    if technique == "adaround":
        r = rq.adaround(resnet, x, data, rq.AdaRoundConfig(**weights), show_progress=False, sim_config=W4A4,
                        precisions_from=mixed(resnet))
    else:
        r = rq.reconstruct_blocks(resnet, x, data, rq.BlockReconConfig(**weights), show_progress=False,
                                  sim_config=W4A4, precisions_from=mixed(resnet))
    sim = mixed(r.model)
    r.apply_to(sim)
    sim.compute_encodings(data, show_progress=False)
    params = sim.parameters_quantized()
    for name, bits in (("stem.0.weight", 8), ("fc.weight", 8), ("layer1.conv1.weight", 4)):
        q, w = sim.quantizer(name), params[name].detach()
        assert q.bitwidth == bits and q.frozen
        assert torch.equal(q(w), w)  # learned on that grid
        assert len(torch.unique(w)) > 16 if bits == 8 else len(torch.unique(w)) <= 16
    if technique == "block_reconstruction":
        names = ("input_x.output", "pool.output", "fc.output", "layer1.relu1.output")
        assert [sim.quantizer(n).bitwidth for n in names] == [8, 8, 8, 4]
    other = rq.QuantSim(zoo.pretrained("digits_mobilenet"), x, W4A4)
    with pytest.raises(ValueError, match="same model"):
        rq.reconstruct_blocks(resnet, x, data, rq.BlockReconConfig(**weights), show_progress=False,
                              sim_config=W4A4, precisions_from=other)


def test_fp16_model_keeps_its_biases_and_learns_finite_steps():
    """Adam on an fp16 bias underflows (eps and squared gradients round to 0: NaN), so only
    fp32 biases learn; an fp16 model's reconstruction must stay finite."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).half().eval()
    data = [torch.randn(16, 16).half() for _ in range(4)]
    cfg = rq.QuantSimConfig(param_bw=4, act_bw=8)
    r = rq.reconstruct_blocks(net, data[0], data, rq.BlockReconConfig(param_bw=4, iterations=30), show_progress=False,
                              sim_config=cfg)
    assert all(torch.equal(r.model.state_dict()[k], v) for k, v in net.state_dict().items() if k.endswith("bias"))
    assert all(torch.isfinite(torch.as_tensor(e["scale"])).all() for e in r.encodings["quantizers"].values() if e)


def test_rows_of_several_batches_are_only_batch_first_values():
    from rapidquant.techniques.block_reconstruction import _gather
    mask, x, seq_first = torch.ones(1, 4), torch.randn(8, 4), torch.randn(10, 8, 4)
    got = _gather([[mask] * 3, [x] * 3, [seq_first] * 3], [0, 2], rows=[8, 8, 8])
    assert [tuple(t.shape) for t in got] == [(1, 4), (16, 4), (10, 8, 4)]


def test_large_steps_run_in_pieces_and_wide_values_stay_inside_blocks(resnet, monkeypatch):
    """Memory bounds for ImageNet-sized maps, forced here on the digits ResNet: a step split
    into pieces of rows learns what the whole step learns (gradients summed), the float path
    kept in fp16 past its threshold changes little, and no block ends at a value too large
    to cache (its blocks merge)."""
    import sys
    BR = sys.modules["rapidquant.techniques.block_reconstruction"]
    x, data = zoo.calibration_batches(1)[0], zoo.calibration_batches(4)
    cfg = rq.BlockReconConfig(param_bw=4, per_channel=False, hw_config="default", iterations=30, cache_fp16=False)

    def run(c=cfg):
        r = rq.reconstruct_blocks(resnet, x, data, c, show_progress=False, sim_config=W4A4)
        return r, r.model.state_dict()

    whole, w_whole = run()
    monkeypatch.setattr(BR, "BLOCK_PIECE_ELEMENTS", 2000)  # a few rows per piece
    _, w_pieces = run()
    weights = [k for k in w_whole if k.endswith("weight")]
    differ = sum((w_whole[k] != w_pieces[k]).sum().item() for k in weights)
    total = sum(w_whole[k].numel() for k in weights)
    # summation order only: measured 27 of 77k weights differ (0.04%) on an Intel Xeon, 1424
    # (1.8%) on an AMD EPYC, at 1 and 2 threads; pieces weighted wrongly (each as the whole
    # step) 7238 (9.4%), the regularizer once per piece 8242 (10.7%); allowed 4%
    assert differ <= 0.04 * total, differ
    monkeypatch.setattr(BR, "BLOCK_PIECE_ELEMENTS", 1 << 24)
    monkeypatch.setattr(BR, "CACHE_FP16_OVER_MB", 0)  # the float path in fp16 from the start
    half, w_half = run(replace(cfg, cache_fp16=None))
    assert any(not torch.equal(w_whole[k], w_half[k]) for k in weights)  # fp16 targets took effect
    # and learn as well: summed block output error measured 2% lower (7% of the rounding
    # differs: undecided weights go either way); allowed 5% higher
    err = [sum(b.mse_reconstructed for b in r.blocks) for r in (whole, half)]
    assert err[1] <= 1.05 * err[0]
    monkeypatch.setattr(BR, "BOUNDARY_MAX_BYTES", 0)  # every value too wide: one block
    merged, _ = run()
    assert len(whole.blocks) > 1 and len(merged.blocks) == 1


def test_rounding_runs_do_not_import_dynamo():
    """AdaRound and block reconstruction in a process that never compiles or exports do not
    import torch._dynamo (about 1.1 s): neither the kernels nor the optimizer pull it in."""
    import subprocess
    import sys
    code = """
import sys, rapidquant as rq
from rapidquant import zoo
m = zoo.pretrained("digits_resnet")
rq.fold_batch_norms_(m)
data = zoo.calibration_batches(2)
cfg = dict(param_bw=4, per_channel=False, iterations=5)
sim_cfg = rq.QuantSimConfig(param_bw=4, act_bw=4, per_channel=False)
rq.adaround(m, data[0], data, rq.AdaRoundConfig(**cfg), sim_config=sim_cfg, show_progress=False)
rq.reconstruct_blocks(m, data[0], data, rq.BlockReconConfig(**cfg), sim_config=sim_cfg, show_progress=False)
assert "torch._dynamo" not in sys.modules, "a rounding run imported torch._dynamo"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
