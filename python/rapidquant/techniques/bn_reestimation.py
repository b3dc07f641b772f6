"""BatchNorm statistics re-estimation (e.g. after QAT or AdaRound changed the weights)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rapidquant.progress import progress
from rapidquant.techniques.patterns import BNS


@dataclass
class BNRestoreHandle:
    """Restores the original BN statistics and settings exactly: ``handle.restore()``."""
    saved: dict = field(default_factory=dict)
    batches: int = 0

    def restore(self) -> None:
        for bn, (mean, var, nbt, momentum, training) in self.saved.items():
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                if nbt is not None:
                    bn.num_batches_tracked.copy_(nbt)
            bn.momentum = momentum
            bn.train(training)
        self.saved.clear()


def reestimate_bn_stats(model: nn.Module, data, num_batches: int | None = None,
                        forward_fn=None, show_progress: bool = True) -> BNRestoreHandle:
    """Recompute every BatchNorm's running mean/var as the average over ``data``.

    Only the BNs run in train mode (cumulative average, momentum None); everything else
    stays in eval mode. Returns a handle whose ``restore()`` puts the old statistics back.
    """
    from rapidquant.batches import call_model
    from rapidquant.batches import cast_floats, model_float_dtype
    bns = [m for m in model.modules() if isinstance(m, BNS) and m.track_running_stats]
    handle = BNRestoreHandle()
    if not bns:
        return handle
    for bn in bns:
        handle.saved[bn] = (bn.running_mean.clone(), bn.running_var.clone(),
                            bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None,
                            bn.momentum, bn.training)
    dtype = model_float_dtype(model)  # fp32 batches for an fp16 model are cast, as moved
    was = model.training
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = plain mean over batches
        bn.train()
    n = 0
    try:
        with torch.no_grad():
            for batch in progress(data, total=num_batches, desc="BN re-estimation", enabled=show_progress):
                if num_batches is not None and n >= num_batches:
                    break
                if forward_fn is None:
                    call_model(model, cast_floats(batch, dtype))
                else:
                    forward_fn(model, batch)
                n += 1
    except BaseException:
        handle.restore()
        raise
    finally:
        for bn in bns:
            bn.eval()
        model.train(was)
    if n == 0:
        handle.restore()
        raise ValueError("reestimate_bn_stats got no batches: the data loader is empty")
    for bn in bns:  # keep the re-estimated statistics, restore the original settings
        bn.momentum = handle.saved[bn][3]
        bn.train(handle.saved[bn][4])
    handle.batches = n
    return handle
