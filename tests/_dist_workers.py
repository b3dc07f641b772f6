"""Worker functions for tests/test_distributed.py (run in spawned processes)."""
import json
import os
import warnings

import torch
import torch.distributed as dist


def _init(rank, world, port):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    from datetime import timedelta
    # rank 0 alone exports and writes the report while rank 1 waits at the next collective:
    # on a loaded 2-core CI machine that took over a minute; a real hang is still caught by
    # test_distributed.spawn's 240 s limit
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=180))


def _teardown():
    """Both ranks reach this point before the group goes away (gloo aborts a process whose
    peer disappears mid-teardown)."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _encodings(sim):
    return {n: (None if q.scale is None else [q.scale.reshape(-1).tolist(), q.zero_point.reshape(-1).tolist()])
            for n, q in sim.quantizers().items()}


def calibration(rank, world, port, out):
    import rapidquant as rq
    from rapidquant import zoo
    _init(rank, world, port)
    try:
        model, data = zoo.pretrained("digits_mobilenet"), zoo.calibration_batches(8)
        res = {}
        for scheme in ("minmax", "sqnr", "percentile"):
            sim = rq.QuantSim(model, data[0], rq.QuantSimConfig(act_scheme=scheme))
            sim.compute_encodings(data, show_progress=False)
            res[scheme] = _encodings(sim)
        for scheme in ("minmax", "sqnr"):  # one batch: rank 1 sees none and must still agree
            sim = rq.QuantSim(model, data[0], rq.QuantSimConfig(act_scheme=scheme))
            sim.compute_encodings(data[:1], show_progress=False)
            res[scheme + " one batch"] = _encodings(sim)
        with open(os.path.join(out, f"calib_{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        _teardown()


def amp_phase1(rank, world, port, out):
    import rapidquant as rq
    from rapidquant import zoo
    _init(rank, world, port)
    try:
        model, data = zoo.pretrained("digits_mobilenet"), zoo.calibration_batches(8)
        sim = rq.QuantSim(model, data[0], rq.QuantSimConfig(per_channel=False, param_bw=4))
        sim.compute_encodings(data, show_progress=False)
        r = rq.amp(sim, ["W4A8", "W8A8", "W16A16"], lambda m: zoo.accuracy(m), 0.003, data, show_progress=False)
        with open(os.path.join(out, f"amp_{rank}.json"), "w") as f:
            json.dump({"phase1": r.phase1, "chosen": r.chosen.config if r.chosen else None,
                       "proxy": r.proxy_evaluations}, f)
    finally:
        _teardown()


def autoquant_single(results_dir: str) -> dict:
    """The AutoQuant run of ``autoquant`` in this process (as one rank or alone): plain data."""
    import rapidquant as rq
    from rapidquant import zoo
    model, data = zoo.pretrained("digits_mobilenet"), zoo.calibration_batches(8)
    cfg = rq.AutoQuantConfig(sim=rq.QuantSimConfig(param_bw=4, act_bw=8, per_channel=False), allowed_drop=0.005,
                             results_dir=results_dir, num_calibration_batches=8,
                             adaround=rq.AdaRoundConfig(iterations=60))
    r = rq.AutoQuant(model, data[0], data, lambda m, n=None: zoo.accuracy(m), cfg, show_progress=False).optimize()
    ada = next(s for s in r.stages if s.name == "adaround")
    return {"score": r.score, "stages": [(s.name, s.status, s.score) for s in r.stages],
            "adaround_layers": ada.artifacts.get("layers"),
            "messages": [s.message for s in r.stages], "report": r.report_path,
            "weights": {k: v.tolist() for k, v in r.model.state_dict().items() if k.endswith("weight")}}


def autoquant(rank, world, port, out):
    _init(rank, world, port)
    try:
        res = autoquant_single(os.path.join(out, "aq"))
        with open(os.path.join(out, f"aq_{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        _teardown()


class _Exploding:
    def __init__(self, data, bad_rank):
        self.data, self.bad_rank = data, bad_rank

    def __iter__(self):
        for i, b in enumerate(self.data):
            if dist.get_rank() == self.bad_rank and i >= 2:
                raise OSError("disk read failed on this rank")
            yield b


def failing(rank, world, port, out):
    import rapidquant as rq
    from rapidquant import zoo
    _init(rank, world, port)
    try:
        model, data = zoo.pretrained("digits_mobilenet"), zoo.calibration_batches(8)
        sim = rq.QuantSim(model, data[0])
        _record_outcome(os.path.join(out, f"fail_{rank}.txt"),
                        lambda: sim.compute_encodings(_Exploding(data, bad_rank=1), show_progress=False))
    finally:
        _teardown()


def _record_outcome(path, fn):
    """Write 'no error' or the exception fn raised ('Type: message') to path."""
    try:
        fn()
        msg = "no error"
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
    with open(path, "w") as f:
        f.write(msg)


def too_few_batches(rank, world, port, out):
    """AdaRound with one batch for two ranks: rank 1 has none; both must stop with an error."""
    import rapidquant as rq
    from rapidquant import zoo
    _init(rank, world, port)
    try:
        data = zoo.calibration_batches(1)
        _record_outcome(os.path.join(out, f"few_{rank}.txt"),
                        lambda: rq.adaround(zoo.pretrained("digits_mobilenet"), data[0], data,
                                            rq.AdaRoundConfig(iterations=5), show_progress=False))
    finally:
        _teardown()


def amp_phase1_failing(rank, world, port, out):
    """Rank 1's proxy scoring fails inside AMP phase 1: both ranks must stop."""
    import sys
    import rapidquant as rq
    from rapidquant import zoo
    amp_module = sys.modules["rapidquant.mixed_precision.amp"]  # the package re-exports amp() under that name
    _init(rank, world, port)
    try:
        model, data = zoo.pretrained("digits_mobilenet"), zoo.calibration_batches(4)
        sim = rq.QuantSim(model, data[0], rq.QuantSimConfig(per_channel=False, param_bw=4))
        sim.compute_encodings(data, show_progress=False)
        if rank == 1:
            def boom(*a, **k):
                raise MemoryError("proxy scoring ran out of memory")
            amp_module.output_sqnr = boom
        _record_outcome(os.path.join(out, f"ampfail_{rank}.txt"),
                        lambda: rq.amp(sim, ["W4A8", "W8A8"], lambda m: zoo.accuracy(m), 0.003, data,
                                       show_progress=False))
    finally:
        _teardown()
