"""Layer-by-layer execution of a QuantSim graph over cached batches.

AdaRound, SeqMSE and empirical bias correction all need, for each layer in execution
order, the layer's input on the (partially) quantized path and on the FP32 path. AIMET
re-runs the model from its input for every layer (quadratic in depth). Here the graph
is interpreted node by node for all cached batches at once, in lockstep with an FP32
twin, so every node runs once per path: each layer sees its inputs after all earlier
layers were adjusted. Activations are freed after their last use, kept within a memory
budget, and spilled to a temporary directory beyond it.
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Callable

import torch
from torch import fx

from rapidquant.batches import cast_floats
from rapidquant.memory import release_free_memory
from rapidquant.quantsim import to_device

HALF_CHECK_PIECE = 1 << 20  # elements per piece of ActivationStore.half's check
# once the store has dropped this much, the C heap's free pages go back to the OS: freed maps
# left in glibc's heap add a few hundred MB to the next node's peak on ImageNet-sized maps
RELEASE_AFTER_BYTES = 32 * 2 ** 20


class ActivationStore:
    """Lists of per-batch tensors by key, spilled to disk past a byte budget. With
    half_over_bytes, values put once the store has held that much are kept in fp16 where fp16
    holds them (``halving``, ``half``); ``reader`` gives them back in fp32."""

    def __init__(self, budget_bytes: int | None, half_over_bytes: int | None = None):
        self.budget = budget_bytes
        self.half_over = half_over_bytes
        self.values = self.halved_values = 0  # lists put, and of those stored in fp16
        self.halved: dict = {}  # key -> per batch: stored in fp16 by half() (not a model's own fp16)
        self.halving_on = False
        self.mem: dict = {}
        self.disk: dict = {}
        self.sizes: dict = {}  # bytes counted at put: elements freed since are still counted
        self.bytes = 0
        self.spilled_bytes = 0
        self.dropped = 0  # bytes dropped since the heap's free pages last went back
        self._dir = None

    @staticmethod
    def _size(v) -> int:
        return sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))

    def halving(self) -> bool:
        """Whether a value put now is to be stored in fp16 (put it with ``halved=True``): from
        the first time the store holds half_over_bytes on (so both paths of a node agree)."""
        self.halving_on = self.halving_on or (self.half_over is not None and self.bytes >= self.half_over)
        return self.halving_on

    @staticmethod
    def half(t):
        """t in fp16 where it is fp32 and fp16 keeps its values: none past fp16's range, and at
        most 1% of the nonzero ones below its normal range (a power spectrum's quiet bins that
        a log reads; any continuous activation has a few values that small); else t itself."""
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel():
            h = t.half()
            tiny = nonzero = 0
            # counted in pieces: whole-tensor masks would add half the value's size at the peak
            for piece, orig in zip(h.reshape(-1).split(HALF_CHECK_PIECE), t.reshape(-1).split(HALF_CHECK_PIECE)):
                a = piece.abs()
                if not bool(torch.isfinite(a.amax())):
                    return t
                zero = int((orig == 0).sum())  # t's own zeros (values fp16 flushes to 0 are tiny)
                tiny += int((a < 6.1e-5).sum()) - zero
                nonzero += piece.numel() - zero
            if tiny <= 0.01 * nonzero:
                return h
        return t

    def reader(self, key) -> Callable:
        """(batch, element) -> the element as it was put (fp32 again where half() stored fp16)."""
        flags = self.halved.get(key)
        if not flags:
            return lambda b, t: t
        return lambda b, t: t.float() if flags[b] else t

    def put(self, key, value: list, halved: list | None = None) -> None:
        """halved: per element, whether it is half() of what the caller computed."""
        self.values += 1
        if halved is not None and any(halved):
            self.halved[key] = halved
            self.halved_values += 1
        self.mem[key] = value
        self.sizes[key] = self._size(value)
        self.bytes += self.sizes[key]
        while self.budget is not None and self.bytes > self.budget and len(self.mem) > 1:
            victim = next(k for k in self.mem if k != key)
            self._spill(victim)

    def _spill(self, key) -> None:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="rapidquant-acts-")
        v = self.mem.pop(key)
        self.bytes -= self.sizes[key]
        path = os.path.join(self._dir.name, f"{len(self.disk)}_{abs(hash(key))}.pt")
        torch.save(v, path)
        self.disk[key] = path
        self.spilled_bytes += self.sizes[key]

    def get(self, key) -> list:
        if key in self.mem:
            return self.mem[key]
        # mapped, not read: pages come in as the batches are used and stay backed by the
        # spill file (copy-on-write, so in-place ops never reach it); where the temp dir is
        # on disk the kernel can drop them again under memory pressure
        return torch.load(self.disk[key], weights_only=False, mmap=True)

    def drop(self, key) -> None:
        """Forget key; past RELEASE_AFTER_BYTES dropped, hand the heap's free pages back."""
        if key in self.mem:
            del self.mem[key]
            size = self.sizes.pop(key)
            self.bytes -= size
            self.dropped += size
        elif key in self.disk:
            del self.sizes[key]
            os.remove(self.disk.pop(key))
        self.halved.pop(key, None)
        if self.dropped >= RELEASE_AFTER_BYTES:
            release_free_memory()
            self.dropped = 0

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()


def collect_batches(data, num_batches: int | None, n_inputs: int, device, shard: bool = False,
                    dtype: torch.dtype | None = None) -> list[tuple]:
    """The first num_batches batches as tuples of model inputs (with shard: this rank's
    share), on ``device`` and with floating tensors cast to ``dtype`` (the model's)."""
    from rapidquant import distributed as D
    out, error = [], None
    try:
        for i, batch in enumerate(data):
            if num_batches is not None and i >= num_batches:
                break
            if shard and not D.mine(i):
                continue
            batch = to_device(batch, device) if device is not None else batch
            batch = cast_floats(batch, dtype)
            if isinstance(batch, dict):
                raise TypeError("layer-wise techniques take positional batches (tensor or tuple), not dicts")
            out.append(tuple(batch[:n_inputs]) if isinstance(batch, (list, tuple)) else (batch,))
        if not out:
            raise ValueError("the data loader yielded no batches for this rank; pass at least one"
                             + (f" per rank (at least {D.world()} batches, or num_batches >= {D.world()})"
                                if shard else ""))
    except Exception as e:  # noqa: BLE001 - re-raised by check_failures on this rank
        error = e
    if shard:  # every rank learns of a rank without batches, instead of waiting for it in a collective
        D.check_failures(error, "collecting batches")
    elif error is not None:
        raise error
    return out


def float_twin(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of a sim's graph with every quantizer off and without their calibration
    statistics (per-channel weight histograms: hundreds of MB on an ImageNet model)."""
    from rapidquant.quantizer import Quantizer
    quantizers = [q for q in gm.modules() if isinstance(q, Quantizer)]
    memo = {id(q.stats): None for q in quantizers if q.stats is not None}  # deepcopy puts None there
    fp = copy.deepcopy(gm, memo)
    for q in fp.modules():
        if isinstance(q, Quantizer):
            q.enabled = False
    return fp


def run_layerwise(sim, batches: list[tuple], targets: set, on_layer: Callable, *,
                  quantize_activations: bool = False, budget_bytes: int | None = None,
                  half_over_bytes: int | None = None) -> dict:
    """Interpret sim.model node by node; before each target module runs, call
    ``on_layer(name, module, q_args, fp_args, node)`` where q_args / fp_args are lists (one
    per batch) of that module's positional inputs on the quantized and FP32 paths.

    The quantized path uses the sim's parameter quantizers (and activation quantizers when
    ``quantize_activations``); the FP32 path is a copy of the graph with every quantizer
    off. Node outputs put while the cache holds more than half_over_bytes are kept in fp16
    (nodes compute in fp32; on_layer gets them as kept). Returns store statistics.
    """
    gm = sim.model
    fp = float_twin(gm)
    fp_mods = dict(fp.named_modules())
    q_mods = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a] = i
    store = ActivationStore(budget_bytes, half_over_bytes)
    act_off = None if quantize_activations else (lambda q: q.name not in sim.param_quantizers())
    try:
        with torch.no_grad(), sim.disabled(act_off) if act_off else _null():
            placeholders = [n for n in nodes if n.op == "placeholder"]
            n_b = len(batches)
            for i, node in enumerate(nodes):
                if node.op == "placeholder":
                    idx = placeholders.index(node)
                    vals = [b[idx] if idx < len(b) else None for b in batches]
                    store.put(("q", node), vals)
                    store.put(("f", node), list(vals))  # each path frees its own list's elements
                elif node.op == "output":
                    break
                else:
                    load = {path: {a: store.get((path, a)) for a in node.all_input_nodes} for path in ("q", "f")}
                    read = {path: {a: store.reader((path, a)) for a in node.all_input_nodes} for path in ("q", "f")}

                    def args_of(path, b, kept=False):  # kept: as stored (fp16 where halved)
                        return fx.node.map_arg(
                            node.args, lambda a: load[path][a][b] if kept else read[path][a](b, load[path][a][b]))

                    if node.op == "call_module" and node.target in targets:  # before the layer runs
                        on_layer(node.target, q_mods[node.target], [args_of("q", b, True) for b in range(n_b)],
                                 [args_of("f", b, True) for b in range(n_b)], node)
                    ending = [a for a in node.all_input_nodes if last_use.get(a) == i]
                    for path, mods, owner in (("q", q_mods, gm), ("f", fp_mods, fp)):
                        outs, halved, halving = [], [], store.halving()
                        for b in range(n_b):
                            kwargs = fx.node.map_arg(node.kwargs, lambda a, b=b: read[path][a](b, load[path][a][b]))
                            out = run_node(node, mods, owner, args_of(path, b), kwargs)
                            kept = store.half(out) if halving else out
                            outs.append(kept)
                            halved.append(kept is not out)
                            for a in ending:  # this batch's input is dead: the peak is one value, not two
                                load[path][a][b] = None
                        store.put((path, node), outs, halved)
                    del load
                for a in node.all_input_nodes:
                    if last_use.get(a) == i:
                        store.drop(("q", a))
                        store.drop(("f", a))
    finally:
        store.close()
    return {"spilled_bytes": store.spilled_bytes, "values": store.values, "halved_values": store.halved_values}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_node(node, mods, gm, args, kwargs):
    """Run one fx node (module, function, method or attribute) on the given arguments."""
    if node.op == "call_module":
        return mods[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise RuntimeError(f"unexpected node {node.op}")


def following_activation(gm: fx.GraphModule, node: fx.Node):
    """The activation module right after node (through its quantized wrapper), if any."""
    from torch import nn
    from rapidquant.qmodules import FunctionalOp, QuantizedModule
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    m = gm.get_submodule(users[0].target)
    inner = m.module if isinstance(m, QuantizedModule) else m
    if isinstance(inner, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU)):
        return inner
    if isinstance(m, FunctionalOp) and m.op_type in ("Relu", "Clip"):
        import torch.nn.functional as F
        return F.relu if m.op_type == "Relu" else F.relu6
    return None


def untreated_weights(sim, supported: tuple, technique: str, treated: set) -> list[tuple[str, str]]:
    """(module name, reason) for every quantized weight-bearing module of ``sim`` that a
    technique leaves alone because of its type, so results never skip in silence."""
    from rapidquant.qmodules import QuantizedModule
    out = []
    for name, m in sim.model.named_modules():
        if not isinstance(m, QuantizedModule) or name in treated or not m.param_quantizers:
            continue
        if not isinstance(m.module, supported):
            params = ", ".join(sorted(m.param_quantizers))
            out.append((name, f"{type(m.module).__name__} ({params}) is not supported by {technique}: "
                              "its weights keep the plain quantizer encoding"))
    return out


def check_finite_weights(model: torch.nn.Module) -> None:
    """A NaN or Inf in a parameter is a broken model, not bad calibration data: name it."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise ValueError(f"parameter '{name}' contains {bad} NaN/Inf value(s) of {p.numel()}: the model's "
                             "weights are broken (a diverged training run or a bad checkpoint); fix or "
                             "reload them before quantizing")
