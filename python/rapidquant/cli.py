"""The ``rapidquant`` command: autoquant, analyze and export, on the embedded demo model or
on your own (``--model pkg.module:factory --data pkg.module:loader --eval pkg.module:fn``)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

DEMO = "the embedded demo: a MobileNetV2-style CNN trained on handwritten digits, with its data"


def load_spec(spec: str, what: str, call: bool = True):
    """'pkg.module:name' -> the object (called without arguments when it is a factory)."""
    if ":" not in spec:
        raise SystemExit(f"error: --{what} expects 'package.module:name' (got {spec!r})")
    mod_name, attr = spec.split(":", 1)
    sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SystemExit(f"error: --{what} {spec!r}: cannot import module {mod_name!r}: {e}") from None
    try:
        obj = mod
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise SystemExit(f"error: --{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
    if call and callable(obj) and not hasattr(obj, "forward") and what != "eval":
        obj = obj()
    return obj


def _inputs(args):
    """(model, data batches, eval_fn, description) from the specs or the demo."""
    import torch
    if args.model is None and args.data is None and args.eval is None:
        from rapidquant import zoo
        n = 4 if args.quick else 16
        return (zoo.pretrained("digits_mobilenet"), zoo.calibration_batches(n),
                lambda m, num_samples=None: zoo.accuracy(m), DEMO)
    missing = [k for k in ("model", "data", "eval") if getattr(args, k) is None]
    if missing:
        raise SystemExit("error: give --model, --data and --eval together (or none of them for the demo); "
                         f"missing: {', '.join('--' + m for m in missing)}")
    model = load_spec(args.model, "model")
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"error: --model {args.model!r} gave {type(model).__name__}, expected a torch.nn.Module "
                         "(or a function returning one)")
    data = load_spec(args.data, "data")
    if not hasattr(data, "__iter__"):
        raise SystemExit(f"error: --data {args.data!r} gave {type(data).__name__}, expected an iterable of batches "
                         "(e.g. a DataLoader, or a function returning one)")
    ev = load_spec(args.eval, "eval", call=False)
    if not callable(ev):
        raise SystemExit(f"error: --eval {args.eval!r} is not callable; expected fn(model, num_samples=None) -> float")
    return model.eval(), data, ev, args.model


def _first_input(batches):
    b = next(iter(batches))
    return b[0] if isinstance(b, (tuple, list)) else b


def _common(p):
    p.add_argument("--model", help="package.module:factory returning an nn.Module (default: the demo)")
    p.add_argument("--data", help="package.module:loader returning an iterable of calibration batches")
    p.add_argument("--eval", help="package.module:fn with fn(model, num_samples=None) -> float, higher is better")
    p.add_argument("--param-bw", type=int, default=None, help="weight bitwidth (default 8; demo 4)")
    p.add_argument("--act-bw", type=int, default=8, help="activation bitwidth (default 8)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--per-channel", dest="per_channel", action="store_true", default=None)
    g.add_argument("--per-tensor", dest="per_channel", action="store_false")
    g.add_argument("--block-size", type=int, default=None,
                   help="per-block weight quantization, blocks of this many input channels")
    p.add_argument("--exclude", default="", help="comma-separated module names left in float")
    p.add_argument("--out", default="rapidquant-results", help="results directory (default ./rapidquant-results)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


EXIT_NOT_MET = 3  # autoquant: finished, but the target was not met (documented in --help)


def _sim_config(args, param_bw: int, per_channel):
    import rapidquant as rq
    exclude = tuple(n.strip() for n in args.exclude.split(",") if n.strip())
    try:
        return rq.QuantSimConfig(param_bw=param_bw, act_bw=args.act_bw, per_channel=per_channel,
                                 block_size=args.block_size, exclude=exclude)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def cmd_autoquant(args) -> int:
    import rapidquant as rq
    model, data, ev, desc = _inputs(args)
    demo = desc == DEMO
    pbw = args.param_bw or (4 if demo else 8)
    per_channel = args.per_channel if args.per_channel is not None else (False if demo and not args.block_size else None)
    ada = rq.AdaRoundConfig(iterations=100) if args.quick else None
    blocks = rq.BlockReconConfig(iterations=100) if args.quick else None
    try:
        cfg = rq.AutoQuantConfig(sim=_sim_config(args, pbw, per_channel),
                                 allowed_drop=args.allowed_drop if args.allowed_drop is not None else (0.005 if demo else 0.01),
                                 amp_candidates=tuple(args.amp.split(",")) if args.amp else None,
                                 amp_cost=args.amp_cost,
                                 results_dir=args.out, time_budget_s=args.time_budget, strict=args.strict,
                                 adaround=ada, block_reconstruction=blocks,
                                 use_block_reconstruction=not args.no_block_reconstruction,
                                 num_calibration_batches=4 if args.quick else 16)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"rapidquant autoquant on {desc}: W{pbw}A{args.act_bw}, allowed drop {cfg.allowed_drop}", file=sys.stderr)
    batches = list(data) if not isinstance(data, list) else data
    res = rq.AutoQuant(model, _first_input(batches), batches, ev, cfg, show_progress=not args.quiet).optimize()
    print(f"\n{'TARGET MET' if res.met else 'target not met'}: score {_fmt(res.score)} on {res.artifact_check} "
          f"(FP32 {_fmt(res.fp32_score)}, target {_fmt(res.target)}, best stage {res.best_stage})\n{res.message}")
    print(f"ONNX model:  {res.onnx_path}\nencodings:   {res.encodings_path}\nreport:      {res.report_path}")
    lat = res.latency
    if lat and not lat.get("error"):
        print(f"latency:     {lat['quantized_ms']:.3f} ms quantized vs {lat['float_ms']:.3f} ms float per run "
              f"(onnxruntime on this machine, {lat['threads']} thread(s); see the report)")
    return 0 if res.met else EXIT_NOT_MET


def _sim(args, model, batches):
    import rapidquant as rq
    return rq.QuantSim(model, _first_input(batches), _sim_config(args, args.param_bw or 8, args.per_channel))


def cmd_analyze(args) -> int:
    import rapidquant as rq
    model, data, ev, desc = _inputs(args)
    batches = list(data)
    sim = _sim(args, model, batches)
    sim.compute_encodings(batches, show_progress=not args.quiet)
    res = rq.analyze(sim, ev, batches, results_dir=args.out, show_progress=not args.quiet)
    print(f"FP32 {res.fp32:.4f}, quantized {res.quantized:.4f}, weights only {res.weights_only:.4f}, "
          f"activations only {res.activations_only:.4f}")
    print("most sensitive: " + ", ".join(res.ranking()[:5]))
    print(f"report: {res.html_path}\njson:   {res.json_path}")
    return 0


def cmd_export(args) -> int:
    import torch
    from rapidquant.autoquant.evaluation import Evaluator
    from rapidquant.batches import call_model
    from rapidquant.export import OnnxRuntimeModule
    model, data, ev, desc = _inputs(args)
    batches = list(data)
    sim = _sim(args, model, batches)
    if args.encodings:
        sim.load_encodings(args.encodings)
    else:
        sim.compute_encodings(batches, show_progress=not args.quiet)
    dummy = _first_input(batches)
    out = sim.export(args.out, dummy, args.name, encoding_format=args.format, overwrite=args.overwrite)
    print(f"ONNX model: {out.onnx}\nencodings:  {out.encodings}\nonnxruntime: runs={out.ort_ok}, "
          f"max |sim - ort| = {out.ort_max_abs_diff}")
    for level, p in out.parity.items():
        steps = "float output" if p.max_steps is None else f"{p.max_steps:.0f} output steps"
        print(f"  parity ({level}): max |diff| {p.max_abs_diff:.3g}, {steps}, "
              f"{100 * p.frac_differing:.2f} % of elements differ")
    if not out.ort_ok:
        return 1
    with torch.no_grad():
        like = call_model(sim.model.eval(), dummy, sim.n_inputs)
    score = Evaluator(ev)
    sim_score = score(sim.model, "the sim")
    try:
        file_score = score(OnnxRuntimeModule(out.onnx, output_like=like), "the exported file in onnxruntime")
    except Exception as e:  # noqa: BLE001 - an eval_fn written for torch modules only
        print(f"score: sim {_fmt(sim_score)}; the eval function could not score the onnxruntime module "
              f"({type(e).__name__}: {e})")
        return 0
    print(f"score: sim {_fmt(sim_score)}, exported file in onnxruntime {_fmt(file_score)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="rapidquant", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("autoquant", help="run AutoQuant (no arguments: " + DEMO + ")",
                       description="Apply PTQ techniques until the allowed accuracy drop is met on the exported "
                                   "ONNX model; writes the ONNX model, encodings and an HTML report.",
                       epilog=f"exit status: 0 target met, {EXIT_NOT_MET} target not met (the best result is "
                              "still written), 1 error")
    _common(p)
    p.add_argument("--allowed-drop", type=float, default=None, help="absolute drop from FP32 (default 0.01; demo 0.005)")
    p.add_argument("--amp", help="AMP candidates, e.g. W8A8,W8A16,W16A16")
    p.add_argument("--amp-cost", choices=("bitops", "latency"), default="bitops",
                   help="AMP picks the point with the fewest BitOps, or the one onnxruntime runs fastest here")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; no new stage starts after that")
    p.add_argument("--strict", action="store_true", help="a failing stage raises instead of being skipped")
    p.add_argument("--no-block-reconstruction", action="store_true",
                   help="skip block reconstruction (it runs after AdaRound when the target is still missed)")
    p.add_argument("--quick", action="store_true", help="fewer batches and AdaRound iterations (smoke tests)")
    p.set_defaults(fn=cmd_autoquant)
    p = sub.add_parser("analyze", help="per-layer sensitivity analysis with an HTML report")
    _common(p)
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_analyze)
    p = sub.add_parser("export", help="calibrate (or load encodings) and export ONNX QDQ + encodings")
    _common(p)
    p.add_argument("--encodings", help="load these encodings instead of calibrating")
    p.add_argument("--format", default="rapidquant", choices=["rapidquant", "1.0.0", "2.0.0"])
    p.add_argument("--name", default="model", help="file name stem (default model)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_export)
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
