"""Kernel benchmark: rapidquant ops vs torch's own ops and a plain copy of the same bytes.

    python bench/bench_kernels.py [--device cpu|cuda] [--threads N] [--rounds R] [--quick]

Prints a markdown table and writes bench/results/kernels_<device>.{md,csv}. Every case is
checked against the pure-torch reference (rapidquant.reference) before it is timed; cases are timed round-robin
(interleaved) and the median is reported.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Case, machine_line, run_interleaved, write_table  # noqa: E402

import rapidquant  # noqa: E402
from rapidquant import ops, reference as R  # noqa: E402
from rapidquant.ops import _utils as U  # noqa: E402


def check(a, b, exact=True, summed=False):
    """exact: bit-equal; else close; summed: a reduction over thousands of terms (a scale's or
    zero point's gradient), whose float32 summation order differs from the reference's."""
    if exact:
        assert torch.equal(a, b), "benchmark case disagrees with the reference"
    elif summed:
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3 * float(b.abs().max()))
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def build_cases(device: str, quick: bool) -> list[Case]:
    n = (1 << 22) if quick else (1 << 24)
    f4 = 4
    x = torch.randn(n, device=device)
    x4 = x.view(16, 64, -1)  # activations: per-channel along axis 1
    w = torch.randn(512, 512, 3, 3, device=device) * 0.05  # conv weight
    nw = w.numel()
    cases: list[Case] = []
    add = cases.append

    # ---- copies: the bandwidth roofline
    y = torch.empty_like(x)
    yw = torch.empty_like(w)
    add(Case("copy_ 16M", lambda: y.copy_(x), 2 * n * f4))
    add(Case("copy_ weight", lambda: yw.copy_(w), 2 * nw * f4))
    # out-of-place ops allocate their output like clone() does; on CPU a fresh 64 MB buffer
    # costs page faults that copy_ into a reused buffer does not pay
    add(Case("clone 16M", lambda: x.clone(), 2 * n * f4))

    # ---- QDQ forward, per tensor
    s, z = torch.tensor(0.02, device=device), torch.tensor(3.0, device=device)
    check(ops.quantize_dequantize(x, s, z, -128, 127), R.quantize_dequantize(x, s.reshape(1), z.reshape(1), -128, 127, [0]))
    add(Case("torch fake_quant per-tensor", lambda: torch.fake_quantize_per_tensor_affine(x, 0.02, 3, -128, 127), 2 * n * f4))
    add(Case("QDQ per-tensor", lambda: ops.quantize_dequantize(x, s, z, -128, 127), 2 * n * f4, "torch fake_quant per-tensor"))
    # in place, into a reused buffer (how QuantSim runs op outputs nobody else holds): the
    # kernel without the fresh output allocation; compare it with copy_, not clone
    xb = x.clone()
    check(ops.quantize_dequantize_(xb, s, z, -128, 127), ops.quantize_dequantize(x, s, z, -128, 127))
    add(Case("QDQ per-tensor in place", lambda: ops.quantize_dequantize_(xb, s, z, -128, 127), 2 * n * f4, "copy_ 16M"))

    # ---- QDQ forward, per channel (activation axis 1 and weight axis 0)
    sc = torch.rand(64, device=device) * 0.02 + 0.01
    zc = torch.zeros(64, device=device)
    zci = zc.int()
    check(ops.quantize_dequantize(x4, sc, zc, -128, 127, axis=1),
          R.quantize_dequantize(x4, sc.reshape(1, -1, 1), zc.reshape(1, -1, 1), -128, 127, [0, 1, 0]))
    add(Case("torch fake_quant per-channel (act)", lambda: torch.fake_quantize_per_channel_affine(x4, sc, zci, 1, -128, 127), 2 * n * f4))
    add(Case("QDQ per-channel (act)", lambda: ops.quantize_dequantize(x4, sc, zc, -128, 127, axis=1), 2 * n * f4, "torch fake_quant per-channel (act)"))
    sw = w.abs().amax((1, 2, 3)) / 127
    zw, zwi = torch.zeros(512, device=device), torch.zeros(512, dtype=torch.int32, device=device)
    # (torch multiplies by 1/scale, so it differs from ONNX at rare ties: check against ours)
    check(ops.quantize_dequantize(w, sw, zw, -128, 127, axis=0),
          R.quantize_dequantize(w, sw.reshape(-1, 1, 1, 1), zw.reshape(-1, 1, 1, 1), -128, 127, [1, 0, 0, 0]))
    add(Case("torch fake_quant per-channel (weight)", lambda: torch.fake_quantize_per_channel_affine(w, sw, zwi, 0, -128, 127), 2 * nw * f4))
    add(Case("QDQ per-channel (weight)", lambda: ops.quantize_dequantize(w, sw, zw, -128, 127, axis=0), 2 * nw * f4, "torch fake_quant per-channel (weight)"))

    # ---- forward + backward with learnable scale / zero point (LSQ)
    xg = x.clone().requires_grad_()
    sg = torch.tensor([0.02], device=device, requires_grad=True)
    zg = torch.tensor([3.0], device=device, requires_grad=True)
    gy = torch.randn_like(x)

    def ours_lsq():
        xg.grad = sg.grad = zg.grad = None
        ops.quantize_dequantize(xg, sg, zg, -128, 127).backward(gy)

    def torch_lsq():
        xg.grad = sg.grad = zg.grad = None
        torch._fake_quantize_learnable_per_tensor_affine(xg, sg, zg, -128, 127, 1.0).backward(gy)

    ours_lsq()
    got = (xg.grad.clone(), sg.grad.clone(), zg.grad.clone())
    xg.grad = sg.grad = zg.grad = None
    R.quantize_dequantize(xg, sg, zg, -128, 127, [0]).backward(gy)  # the reference's autograd (LSQ)
    for i, (a, b) in enumerate(zip(got, (xg.grad, sg.grad, zg.grad))):
        check(a, b, exact=False, summed=i > 0)
    add(Case("torch learnable fake_quant fwd+bwd", torch_lsq, 5 * n * f4))
    add(Case("QDQ fwd+bwd learnable (LSQ)", ours_lsq, 5 * n * f4, "torch learnable fake_quant fwd+bwd"))

    wg = w.clone().requires_grad_()
    swg = sw.clone().requires_grad_()
    zwg = zw.clone().requires_grad_()
    gw = torch.randn_like(w)

    def ours_lsq_c():
        wg.grad = swg.grad = zwg.grad = None
        ops.quantize_dequantize(wg, swg, zwg, -128, 127, axis=0).backward(gw)

    def torch_lsq_c():
        wg.grad = swg.grad = zwg.grad = None
        torch._fake_quantize_learnable_per_channel_affine(wg, swg, zwg, 0, -128, 127, 1.0).backward(gw)

    ours_lsq_c()
    got = (wg.grad.clone(), swg.grad.clone(), zwg.grad.clone())
    wg.grad = swg.grad = zwg.grad = None
    R.quantize_dequantize(wg, swg.reshape(-1, 1, 1, 1), zwg.reshape(-1, 1, 1, 1), -128, 127, [1, 0, 0, 0]).backward(gw)
    for i, (a, b) in enumerate(zip(got, (wg.grad, swg.grad, zwg.grad))):
        check(a, b.reshape(a.shape), exact=False, summed=i > 0)
    add(Case("torch learnable per-channel fwd+bwd", torch_lsq_c, 5 * nw * f4))
    add(Case("QDQ per-channel fwd+bwd learnable", ours_lsq_c, 5 * nw * f4, "torch learnable per-channel fwd+bwd"))

    # ---- float formats
    fs = torch.tensor(0.01, device=device)
    check(ops.float_quantize_dequantize(x, torch.float8_e4m3fn, scale=fs),
          R.float_quantize_dequantize(x, torch.float8_e4m3fn, scale=fs.reshape(1), spec=[0]))
    add(Case("torch fp8 e4m3 cast qdq", lambda: (x / fs).clamp(-448, 448).to(torch.float8_e4m3fn).float() * fs, 2 * n * f4))
    add(Case("float QDQ fp8 e4m3", lambda: ops.float_quantize_dequantize(x, torch.float8_e4m3fn, scale=fs), 2 * n * f4, "torch fp8 e4m3 cast qdq"))

    # ---- min / max
    for got, want in ((ops.minmax(x), R.minmax(x, [0])), (ops.minmax(x4, axis=1), R.minmax(x4, [0, 1, 0])),
                      (ops.minmax(w, axis=0), R.minmax(w, [1, 0, 0, 0]))):
        for a, b in zip(got, want):
            check(a.reshape(-1), b.reshape(-1))
    add(Case("torch.aminmax", lambda: torch.aminmax(x), n * f4))
    add(Case("minmax per-tensor", lambda: ops.minmax(x), n * f4, "torch.aminmax"))
    add(Case("torch amin+amax per-channel (act)", lambda: (x4.amin((0, 2)), x4.amax((0, 2))), n * f4))
    add(Case("minmax per-channel (act)", lambda: ops.minmax(x4, axis=1), n * f4, "torch amin+amax per-channel (act)"))
    w2 = w.view(512, -1)
    add(Case("torch.aminmax per-channel (weight)", lambda: torch.aminmax(w2, dim=1), nw * f4))
    add(Case("minmax per-channel (weight)", lambda: ops.minmax(w, axis=0), nw * f4, "torch.aminmax per-channel (weight)"))

    # ---- histograms
    check(ops.histogram(x, 2048, -4.0, 4.0).reshape(-1).long(),
          R.histogram(x, torch.tensor([-4.0]), torch.tensor([4.0]), 2048, [0]).reshape(-1).to(x.device))
    add(Case("torch.histc 2048", lambda: torch.histc(x, 2048, -4, 4), n * f4))
    add(Case("histogram 2048 per-tensor", lambda: ops.histogram(x, 2048, -4.0, 4.0), n * f4, "torch.histc 2048"))
    mn, mx = ops.minmax(w, axis=0)
    check(ops.histogram(w, 256, mn, mx, axis=0).long().cpu(),
          R.histogram(w.cpu(), mn.reshape(-1, 1, 1, 1).cpu(), mx.reshape(-1, 1, 1, 1).cpu(), 256, [1, 0, 0, 0]))
    add(Case("torch.histc looped per channel (512x256)", lambda: [torch.histc(w2[c], 256, float(mn[c]), float(mx[c])) for c in range(512)], nw * f4))
    add(Case("histogram per-channel (512x256)", lambda: ops.histogram(w, 256, mn, mx, axis=0), nw * f4, "torch.histc looped per channel (512x256)"))

    # ---- range search over 2048-bin histograms
    C = 64 if not quick else 16
    xs = torch.randn(C, 20000, device=device) * (torch.rand(C, 1, device=device) + 0.5)
    hmn, hmx = ops.minmax(xs, axis=0)
    hist = ops.histogram(xs, 2048, hmn, hmx, axis=0)
    cs, cz = ops.sqnr_candidates(hmn.cpu(), hmx.cpu(), 0, 255, symmetric=False)
    cs, cz = cs.to(device), cz.to(device)

    def torch_search_loop():  # per channel, candidates vectorized: what a Python analyzer does
        out = []
        for c in range(C):
            out.append(R.range_search(hist[c:c + 1].cpu(), hmn[c:c + 1].cpu(), hmx[c:c + 1].cpu(),
                                      cs[c:c + 1].cpu(), cz[c:c + 1].cpu(), 0, 255, 3.0, True))
        return out

    a, b = ops.range_search(hist, hmn, hmx, cs, cz, 0, 255, gamma=3.0, product=True)
    ra, rb = R.range_search(hist.cpu(), hmn.cpu(), hmx.cpu(), cs.cpu(), cz.cpu(), 0, 255, 3.0, True)
    check(a.cpu(), ra, exact=False)
    K = cs.shape[1] * cz.shape[1]
    add(Case(f"pure-torch range search loop ({C} ch x {K} cand x 2048 bins)", torch_search_loop, hist.numel() * 8))
    add(Case(f"range_search ({C} ch x {K} cand x 2048 bins)",
             lambda: ops.range_search(hist, hmn, hmx, cs, cz, 0, 255, gamma=3.0, product=True),
             hist.numel() * 8, f"pure-torch range search loop ({C} ch x {K} cand x 2048 bins)"))

    # ---- AdaRound fused step vs reference autograd
    v = torch.zeros_like(w, requires_grad=True)
    tgt = torch.randn_like(w)
    spec = U.block_spec(w.shape, 0, None)

    def ada_ours():
        v.grad = None
        out, reg = ops.adaround_weight(w, v, sw, zw, -8, 7, axis=0, beta=10.0)
        torch.autograd.backward([out, reg], [tgt, torch.tensor(0.01, device=device)])

    def ada_ref():
        v.grad = None
        out, reg = R.adaround_weight(w, v, sw.reshape(-1, 1, 1, 1), zw.reshape(-1, 1, 1, 1), -8, 7, spec, 10.0)
        torch.autograd.backward([out, reg], [tgt, torch.tensor(0.01, device=device)])

    ada_ours()
    got = v.grad.clone()
    ada_ref()
    check(got, v.grad, exact=False)
    add(Case("reference AdaRound fwd+bwd (torch autograd)", ada_ref, 5 * nw * f4))
    add(Case("AdaRound fused fwd+bwd", ada_ours, 5 * nw * f4, "reference AdaRound fwd+bwd (torch autograd)"))
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--quick", action="store_true", help="4M elements instead of 16M")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cases = build_cases(args.device, args.quick)
    run_interleaved(cases, args.device, rounds=args.rounds)
    by_name = {c.name: c for c in cases}
    copy_bw = by_name["copy_ 16M"].nbytes / by_name["copy_ 16M"].median
    copy_bw_w = by_name["copy_ weight"].nbytes / by_name["copy_ weight"].median
    clone_bw = by_name["clone 16M"].nbytes / by_name["clone 16M"].median
    rows = []
    for c in cases:
        bw = c.nbytes / c.median
        small = "weight" in c.name or "AdaRound" in c.name or "512x256" in c.name
        ref_bw = copy_bw_w if small else copy_bw
        base = by_name.get(c.baseline)
        rows.append({
            "op": c.name,
            "median ms": f"{c.median * 1e3:.3f}",
            "GB/s": f"{bw / 1e9:.1f}",
            "x copy_ bw": f"{bw / ref_bw:.2f}",
            "x clone bw": "" if small else f"{bw / clone_bw:.2f}",
            "speed-up vs torch baseline": f"{base.median / c.median:.1f}x" if base else "",
        })
    title = f"Kernels on {machine_line(args.device)}; rapidquant {rapidquant.__version__}"
    md = write_table(rows, os.path.join(args.out, f"kernels_{args.device}"), title)
    print(md)


if __name__ == "__main__":
    main()
