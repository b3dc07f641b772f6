"""Quantized twins of nn.LSTM, nn.GRU, nn.LSTMCell and nn.GRUCell.

A twin computes the cell from ordinary ops (linear, sigmoid, tanh, mul, add, sub) and
passes every op output through a quantizer, as AIMET's quantized LSTM does, so that the
exported ONNX model is ordinary ops with QuantizeLinear/DequantizeLinear pairs: the sim
and onnxruntime then compute the same thing op by op (no fused ONNX LSTM/GRU, which
could not represent quantization inside the cell).

Quantizers (``<m>`` is the module's name in the model, ``<l>`` a layer-direction such as
``l0``, ``l1_reverse``; cells have no ``.<l>`` part):

- parameters, one quantizer per PyTorch parameter, i.e. per stacked gate matrix:
  ``<m>.weight_ih_l0``, ``<m>.weight_hh_l0``, ``<m>.weight_ih_l0_reverse``, ... (cells:
  ``<m>.weight_ih``, ``<m>.weight_hh``). They follow the hardware config's rules for
  "Gemm" weights; with per-channel quantization every gate row has its own scale (finer
  than one scale per gate). Biases follow the config's bias rule (float by default).
- activations, shared by all time steps of a layer-direction (op type in brackets,
  which the hardware config sees):
  LSTM: ``ih`` (Gemm: x W_ih^T + b_ih), ``hh`` (Gemm: h W_hh^T + b_hh), ``gates``
  (Add), ``i``, ``f``, ``o`` (Sigmoid), ``g`` (Tanh), ``fc`` (Mul: f*c), ``ig``
  (Mul: i*g), ``c`` (Add: the new cell state), ``tanh_c`` (Tanh), ``h`` (Mul: the new
  hidden state = the layer's output), e.g. ``lstm.l0.h``.
  GRU: ``ih``, ``hh`` (Gemm), ``rz`` (Add: r and z pre-activations), ``r``, ``z``
  (Sigmoid), ``r_hn`` (Mul: r*(W_hn h + b_hn)), ``n_pre`` (Add), ``n`` (Tanh),
  ``h_minus_n`` (Sub), ``z_d`` (Mul), ``h`` (Add: h' = n + z*(h - n), the new state).
  Integer activation quantizers get ``config.recurrent_act_bw`` bits (16 by default) when
  the hardware config runs activations that wide: 8-bit rounding inside the recurrence
  compounds over the time steps. The twin lists them in ``raised`` (QuantSim in
  ``sim.widened``).

Initial states (h0, c0) are used as given (when they are model inputs QuantSim's input
quantizers quantize them; zeros when omitted). Inputs must be tensors (no
PackedSequence); LSTM projections (proj_size > 0) are not supported.

Export: under torch.export (what ``sim.export`` uses) the loop over time becomes a
``torch.scan``, which torch.onnx writes as one ONNX ``Scan`` per layer-direction (a
graph whose size does not grow with the sequence). The sequence length stays a runtime
value when the time dimension is exported as dynamic (``sim.export`` makes only the
batch dimension dynamic today, so its file keeps the dummy input's length). The
quantizers inside the loop then have their QuantizeLinear nodes inside the Scan body;
the export's tensor-name mapping covers only the top-level graph, so it lists them as
unmapped and the encodings file does not name their tensors. Set
``rapidquant.recurrent.EXPORT_LOOP = "unroll"`` to unroll the loop instead: one copy of
the cell per time step, every quantizer named, and the ONNX model only accepts the dummy
input's sequence length (a warning says so when warnings are not silenced).
The sim, the Scan export and the unrolled export compute the same values (onnxruntime
with optimizations off matches the sim bit for bit).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rapidquant.qmodules import QuantizedModule
from rapidquant.quantizer import Quantizer, apply_encoding_constraints

RECURRENT = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)
EXPORT_LOOP = "scan"  # "scan": one ONNX Scan per layer-direction; "unroll": one copy of the cell per step

# activation quantizers of one cell: key -> op type in the hardware config
LSTM_ACTS = {"ih": "Gemm", "hh": "Gemm", "gates": "Add", "i": "Sigmoid", "f": "Sigmoid", "g": "Tanh",
             "o": "Sigmoid", "fc": "Mul", "ig": "Mul", "c": "Add", "tanh_c": "Tanh", "h": "Mul"}
GRU_ACTS = {"ih": "Gemm", "hh": "Gemm", "rz": "Add", "r": "Sigmoid", "z": "Sigmoid", "r_hn": "Mul",
            "n_pre": "Add", "n": "Tanh", "h_minus_n": "Sub", "z_d": "Mul", "h": "Add"}
PARAM_OP_TYPE = "Gemm"  # the gate matrices are quantized like a Linear layer's weight


class QuantizerFactory:
    """Makes a twin's quantizers by the same rules QuantSim applies to any layer.

    ``new_quantizer(name, param=..., op_type=..., pname=..., axis=..., block_size=...)`` is
    QuantSim's constructor of one quantizer; ``hw`` the parsed hardware config, ``config``
    the QuantSimConfig."""

    def __init__(self, new_quantizer: Callable[..., Quantizer], hw, config):
        self.new_quantizer, self.hw, self.config = new_quantizer, hw, config
        self.raised: dict[str, str] = {}  # activation quantizer -> why it has more bits than the config's

    def param(self, name: str, p: torch.Tensor, kind: str) -> Quantizer | None:
        hw, c = self.hw, self.config
        if not hw.param_quantized(PARAM_OP_TYPE, kind):
            return None
        per_ch = c.per_channel if c.per_channel is not None else hw.per_channel(PARAM_OP_TYPE)
        axis = 0 if (per_ch and kind == "weight") else None
        block = None
        if c.block_size and kind == "weight" and p.shape[1] % c.block_size == 0:
            block, axis = c.block_size, 0
        return self.new_quantizer(name, param=True, op_type=PARAM_OP_TYPE, pname=kind, axis=axis,
                                  block_size=block)

    def act(self, name: str, op_type: str) -> Quantizer | None:
        if not self.hw.output_quantized(op_type):
            return None
        q = self.new_quantizer(name, param=False, op_type=op_type)
        bw = self.config.recurrent_act_bw
        if bw is not None and q.dtype == "int" and q.bitwidth < bw and self.hw.runs_activation_bits(bw, op_type):
            self.raised[name] = (f"{q.bitwidth} -> {bw} bits: inside a recurrent cell, where rounding compounds "
                                 "over the time steps (QuantSimConfig(recurrent_act_bw=None) keeps the act bitwidth)")
            q.set_precision("int", bw)
        apply_encoding_constraints(q, self.hw.encoding_constraints(op_type))
        return q


class CellQuantizers(nn.Module):
    """The activation quantizers of one layer-direction (shared by all its time steps)."""

    def __init__(self, prefix: str, acts: dict, make: QuantizerFactory):
        super().__init__()
        qs = {k: make.act(f"{prefix}.{k}", op) for k, op in acts.items()}
        self.qs = nn.ModuleDict({k: q for k, q in qs.items() if q is not None})

    def forward(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self.qs[key](x) if key in self.qs else x


# ---------------------------------------------------------------------- cell math
def lstm_step(cq: CellQuantizers, ih: torch.Tensor, h, c, w_hh, b_hh):
    """One LSTM step from the quantized input projection ih = x W_ih^T + b_ih."""
    gates = cq("gates", ih + cq("hh", F.linear(h, w_hh, b_hh)))
    i, f, g, o = gates.chunk(4, -1)
    i, f = cq("i", torch.sigmoid(i)), cq("f", torch.sigmoid(f))
    g, o = cq("g", torch.tanh(g)), cq("o", torch.sigmoid(o))
    c = cq("c", cq("fc", f * c) + cq("ig", i * g))
    h = cq("h", o * cq("tanh_c", torch.tanh(c)))
    return h, c


def gru_step(cq: CellQuantizers, ih: torch.Tensor, h, w_hh, b_hh):
    """One GRU step: h' = (1 - z) * n + z * h, written as n + z * (h - n)."""
    hh = cq("hh", F.linear(h, w_hh, b_hh))
    sizes = [2 * h.shape[-1], h.shape[-1]]  # split, not slicing: slices break scan with a symbolic batch
    ih_rz, ih_n = ih.split(sizes, -1)
    hh_rz, hh_n = hh.split(sizes, -1)
    r, z = torch.sigmoid(cq("rz", ih_rz + hh_rz)).chunk(2, -1)
    r, z = cq("r", r), cq("z", z)
    n = cq("n", torch.tanh(cq("n_pre", ih_n + cq("r_hn", r * hh_n))))
    return cq("h", n + cq("z_d", z * cq("h_minus_n", h - n)))


def _export_scan():
    """torch.scan when exporting with EXPORT_LOOP == "scan" (and this torch has it), else None."""
    if EXPORT_LOOP not in ("scan", "unroll"):
        raise ValueError(f"rapidquant.recurrent.EXPORT_LOOP must be 'scan' or 'unroll' (got {EXPORT_LOOP!r})")
    if EXPORT_LOOP != "scan" or not torch.compiler.is_exporting():
        return None
    try:
        from torch._higher_order_ops.scan import scan
        return scan
    except ImportError:  # an older torch: unroll
        return None


@contextmanager
def unrolled_loops():
    """Export recurrent loops unrolled inside this block (the export's fallback when a Scan
    cannot be traced, e.g. a sequence length computed from tensor values)."""
    global EXPORT_LOOP
    was, EXPORT_LOOP = EXPORT_LOOP, "unroll"
    try:
        yield
    finally:
        EXPORT_LOOP = was


def has_twins(model: nn.Module) -> bool:
    return any(isinstance(m, RECURRENT_TWINS) for m in model.modules())


def _warn_if_unrolled(name: str, steps: int) -> None:
    if torch.compiler.is_exporting() and _export_scan() is None:
        warnings.warn(f"{name}: the recurrent loop is unrolled over the dummy input's {steps} steps; "
                      "the exported model accepts only that sequence length", stacklevel=3)


def _run_sequence(step, xs: torch.Tensor, state: tuple):
    """Run step(state, x_t) -> state over xs (time first). Returns (outputs, final state);
    the output of a step is its first state tensor (h)."""
    scan = _export_scan()
    if scan is not None:
        def body(carry, x):
            new = step(carry, x)
            return new, new[0].clone()  # scan: an output may not alias the carry
        # nor may two carries alias each other (a model passing (h, h) as its initial states)
        final, ys = scan(body, tuple(s.clone() for s in state), xs)
        return ys, final
    ys = []
    for t in range(xs.shape[0]):
        state = step(state, xs[t])
        ys.append(state[0])
    return torch.stack(ys), state


# ---------------------------------------------------------------------- twins
class _RecurrentBase(QuantizedModule):
    """Shared construction: one param quantizer per weight matrix, one CellQuantizers per
    layer-direction (the layer's output grid is the last layer's ``h`` quantizer)."""

    def __init__(self, module: nn.Module, name: str, make: QuantizerFactory, cells: list[str], acts: dict):
        if getattr(module, "proj_size", 0):
            raise ValueError(f"{name}: LSTM with proj_size > 0 has no quantized twin yet; leave it in float "
                             f"with QuantSimConfig(exclude=({name!r},))")
        pq = {}
        for pname, p in module.named_parameters():
            kind = "bias" if pname.startswith("bias") else "weight"
            q = make.param(f"{name}.{pname}", p, kind)
            if q is not None:
                pq[pname] = q
        cellq = {c: CellQuantizers(f"{name}.{c}" if c else name, acts, make) for c in cells}
        # no output_quantizer: the export names a wrapper's unnamed Q nodes after it, and the
        # first one inside a twin is an "ih" projection, not the output
        super().__init__(module, type(module).__name__.replace("Cell", ""), pq, None)
        self.cells = nn.ModuleDict({(c or "cell"): v for c, v in cellq.items()})
        self.name = name
        self.raised = dict(make.raised)  # internal activations given more bits (QuantSim lists them in sim.widened)
        self._gates = 4 if isinstance(module, (nn.LSTM, nn.LSTMCell)) else 3
        self.macs: dict[str, int] = {}  # per layer-direction, of the last eager forward

    def _count(self, cell: str, steps_x_batch: int, in_features: int) -> None:
        if not torch.compiler.is_compiling():  # plain ints only (no symbolic shapes)
            h = self.module.hidden_size
            self.macs[cell] = int(steps_x_batch) * self._gates * h * (in_features + h)

    def quantizer_groups(self) -> dict[str, dict]:
        """Mixed precision: per layer-direction (``lstm.l0``, ``lstm.l0_reverse``; a cell:
        its name) the enabled quantizers that change precision together (its gate
        matrices and its cell's activations) and its MACs in the last forward pass."""
        out = {}
        for cell, cq in self.cells.items():
            sfx = f"_{cell}" if cell != "cell" else ""
            params = [q.name for k, q in self.param_quantizers.items() if q.enabled and (not sfx or k.endswith(sfx))]
            out[f"{self.name}.{cell}" if sfx else self.name] = {
                "params": params, "acts": [q.name for q in cq.qs.values() if q.enabled],
                "macs": self.macs.get(cell, 0)}
        return out

    def _w(self, pname: str):
        """A parameter after its quantizer (None for a missing bias)."""
        if pname in self.param_quantizers:
            return self.quantized_param(pname)
        return getattr(self.module, pname, None)


class QuantizedRNN(_RecurrentBase):
    """Quantized nn.LSTM / nn.GRU: num_layers, bidirectional, batch_first, dropout,
    optional initial states, unbatched inputs; returns what the torch module returns."""

    def __init__(self, module: nn.LSTM | nn.GRU, name: str, make: QuantizerFactory):
        dirs = ["", "_reverse"] if module.bidirectional else [""]
        cells = [f"l{k}{d}" for k in range(module.num_layers) for d in dirs]
        super().__init__(module, name, make, cells, LSTM_ACTS if isinstance(module, nn.LSTM) else GRU_ACTS)

    def forward(self, x, hx=None):
        m = self.module
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: the quantized {type(m).__name__} takes a tensor input "
                            f"(got {type(x).__name__}); pad the sequences instead of packing them")
        lstm = isinstance(m, nn.LSTM)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
            hx = None if hx is None else tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
        elif m.batch_first:
            x = x.transpose(0, 1)
        D = 2 if m.bidirectional else 1
        _warn_if_unrolled(self.name, x.shape[0])
        if hx is None:
            z = x.new_zeros(m.num_layers * D, x.shape[1], m.hidden_size)
            hx = (z, torch.zeros_like(z)) if lstm else z  # distinct tensors: scan rejects aliased inputs
        h0, c0 = hx if lstm else (hx, None)
        hn, cn = [], []
        for k in range(m.num_layers):
            outs = []
            for d, sfx in enumerate(["", "_reverse"][:D]):
                idx = k * D + d
                y, st = self._direction(x, f"l{k}{sfx}", h0[idx], None if c0 is None else c0[idx], reverse=d == 1)
                outs.append(y)
                hn.append(st[0])
                if lstm:
                    cn.append(st[1])
            x = outs[0] if D == 1 else torch.cat(outs, -1)
            if m.dropout and self.training and k < m.num_layers - 1:
                x = F.dropout(x, m.dropout, True)
        out = x
        if unbatched:
            out = out.squeeze(1)
        elif m.batch_first:
            out = out.transpose(0, 1)
        hn = torch.stack(hn)
        hn = hn.squeeze(1) if unbatched else hn
        if not lstm:
            return out, hn
        cn = torch.stack(cn)
        return out, (hn, cn.squeeze(1) if unbatched else cn)

    def _direction(self, x, cell: str, h, c, reverse: bool):
        cq = self.cells[cell]
        self._count(cell, x.shape[0] * x.shape[1], x.shape[-1])
        ih = cq("ih", F.linear(x, self._w(f"weight_ih_{cell}"), self._w(f"bias_ih_{cell}")))
        w_hh, b_hh = self._w(f"weight_hh_{cell}"), self._w(f"bias_hh_{cell}")
        if reverse:
            ih = ih.flip(0)
        if c is not None:
            ys, st = _run_sequence(lambda s, t: lstm_step(cq, t, s[0], s[1], w_hh, b_hh), ih, (h, c))
        else:
            ys, st = _run_sequence(lambda s, t: (gru_step(cq, t, s[0], w_hh, b_hh),), ih, (h,))
        return (ys.flip(0) if reverse else ys), st


class QuantizedCell(_RecurrentBase):
    """Quantized nn.LSTMCell / nn.GRUCell (one step; batched or unbatched input)."""

    def __init__(self, module: nn.LSTMCell | nn.GRUCell, name: str, make: QuantizerFactory):
        super().__init__(module, name, make, [""], LSTM_ACTS if isinstance(module, nn.LSTMCell) else GRU_ACTS)

    def forward(self, x, hx=None):
        m = self.module
        lstm = isinstance(m, nn.LSTMCell)
        unbatched = x.dim() == 1
        if unbatched:
            x = x.unsqueeze(0)
            if hx is not None:
                hx = tuple(h.unsqueeze(0) for h in hx) if lstm else hx.unsqueeze(0)
        if hx is None:
            z = x.new_zeros(x.shape[0], m.hidden_size)
            hx = (z, torch.zeros_like(z)) if lstm else z
        cq = self.cells["cell"]
        self._count("cell", x.shape[0], x.shape[-1])
        ih = cq("ih", F.linear(x, self._w("weight_ih"), self._w("bias_ih")))
        w_hh, b_hh = self._w("weight_hh"), self._w("bias_hh")
        if lstm:
            h, c = lstm_step(cq, ih, hx[0], hx[1], w_hh, b_hh)
            return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)
        h = gru_step(cq, ih, hx, w_hh, b_hh)
        return h.squeeze(0) if unbatched else h


RECURRENT_TWINS = (QuantizedRNN, QuantizedCell)


def has_twin(module: nn.Module) -> bool:
    """LSTM projections (proj_size > 0) have no twin: such a module is a float leaf, named."""
    return not getattr(module, "proj_size", 0)


def quantized_twin(module: nn.Module, name: str, new_quantizer: Callable[..., Quantizer], hw, config):
    """The quantized twin of an nn.LSTM/GRU/LSTMCell/GRUCell, built with QuantSim's rules."""
    make = QuantizerFactory(new_quantizer, hw, config)
    if isinstance(module, (nn.LSTM, nn.GRU)):
        return QuantizedRNN(module, name, make)
    return QuantizedCell(module, name, make)
