"""all-MiniLM-L6-v2 sentence embeddings: summary -> body retrieval over CPython docstrings.
Score: recall@1; notes: mean cosine similarity of the embeddings to the float model's.
Every Linear, LayerNorm, GELU, softmax, matmul and residual add is quantized."""
from __future__ import annotations

import torch

import rapidquant as rq

from . import aimet
from .table import Timer, row

CASE = "all-MiniLM-L6-v2"


def retrieval_task(quick: bool):
    """(float model, summary batches, body batches, calibration batches) of the retrieval task:
    the first 192 pairs (``quick``) or all but the last 64 scored, the last 64 calibrating
    (summaries and bodies, 16 per batch). ImportError when the model's package is missing."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rapidquant.zoo import minilm as L
    fp = L.pretrained()
    pairs = L.docstring_pairs()
    n_eval = 192 if quick else len(pairs) - 64
    ev, cal = pairs[:n_eval], pairs[-64:]
    body_len = 96 if quick else 128
    qs = [L.tokenize([p[0] for p in ev[i:i + 64]]) for i in range(0, len(ev), 64)]
    ds = [L.tokenize([p[1] for p in ev[i:i + 64]], body_len) for i in range(0, len(ev), 64)]
    calib = [L.tokenize([p[k] for p in cal[i:i + 16]], body_len) for i in range(0, len(cal), 16) for k in (0, 1)]
    return fp, qs, ds, calib


def minilm_case(quick: bool):
    from rapidquant.zoo import minilm as L
    try:
        fp, qs, ds, calib = retrieval_task(quick)
    except ImportError as e:
        print(f"  minilm: skipped ({e})")
        return
    q0, d0 = L.embed(fp, qs), L.embed(fp, ds)
    print(f"  {CASE}: {sum(len(q[0]) for q in qs)} summary/body pairs from stdlib docstrings, "
          f"{len(calib)} calibration batches")

    def evaluate(model):
        q, d = L.embed(model, qs), L.embed(model, ds)
        cos = torch.cat([(q * q0).sum(1), (d * d0).sum(1)]).mean().item()
        return L.retrieval_recall(q, d), cos

    f, _ = evaluate(fp)
    row(CASE, "FP32", f, f, 0, "recall@1")
    # every W8A8 grid at 8 bits, as AIMET's (widen_destroyed=None); then the default, which
    # raises the grids that destroy their data to 16 bits
    for act_bw, scheme, widen in ((8, "minmax", None), (8, "mse", None), (8, "minmax", 16), (16, "minmax", None)):
        with Timer() as t:
            sim = rq.QuantSim(fp, calib[0], rq.QuantSimConfig(param_bw=8, act_bw=act_bw, act_scheme=scheme,
                                                              widen_destroyed=widen))
            sim.compute_encodings(calib, show_progress=False)
        a = None
        if widen is not None:
            s, cos = evaluate(sim.model)
            row(CASE, f"W8A{act_bw} per-channel, {scheme}, {len(sim.widened)} destroyed grids raised to 16 bits "
                "(the default)", s, f, t.seconds, f"cosine {cos:.4f}")
            continue
        if scheme == "minmax":
            if aimet.available():
                aimet.teach_minilm()
            a = aimet.run("quantsim", lambda: aimet.quantsim(fp, calib[0], calib, 8, act_bw, per_channel=True),
                          lambda m: evaluate(m)[0])
        s, cos = evaluate(sim.model)
        row(CASE, f"W8A{act_bw} per-channel, {scheme} activation ranges", s, f, t.seconds, f"cosine {cos:.4f}",
            aimet=a)
    cands, proxy, recall = ["W8A8", "W8A16", "W16A16"], 1 if quick else 2, lambda m: evaluate(m)[0]
    with Timer() as t:
        sim = rq.QuantSim(fp, calib[0], rq.QuantSimConfig(param_bw=8, act_bw=8, act_scheme="mse"))
        sim.compute_encodings(calib, show_progress=False)
        r = rq.amp(sim, cands, recall, 0.01, calib, num_proxy_batches=proxy, show_progress=False)
    pt = r.chosen or max(r.pareto_front, key=lambda p: p.score)
    a = aimet.run("amp", lambda: aimet.amp(fp, calib[0], calib, recall, cands, 0.01, proxy, per_channel=True), recall)
    row(CASE, "AMP W8A8/W8A16/W16A16, drop 0.01", pt.score, f, t.seconds,
        f"{pt.rel_bitops:.2f}x BitOps of W16A16; {r.message}", aimet=a)
