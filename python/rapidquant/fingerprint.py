"""Content hashes for caches: model weights, data batches, configs."""
from __future__ import annotations

import hashlib
import json

import torch


def hash_tensors(tensors, h=None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(t).encode())
    return h


def model_hash(model: torch.nn.Module) -> str:
    """Hash of the model's own weights and buffers; quantizer encodings are left out, so
    a sim hashes the same whatever precision it is currently set to."""
    from rapidquant.quantizer import Quantizer
    skip = {n for n, m in model.named_modules() if isinstance(m, Quantizer)}
    sd = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in skip}
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        hash_tensors([sd[k]], h)
    return h.hexdigest()[:16]


def data_hash(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        if isinstance(b, dict):
            for k in sorted(b):
                h.update(k.encode())
                hash_tensors([b[k]], h)
        elif isinstance(b, (list, tuple)):
            hash_tensors(b, h)
        else:
            hash_tensors([b], h)
    return h.hexdigest()[:16]


def obj_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:16]
