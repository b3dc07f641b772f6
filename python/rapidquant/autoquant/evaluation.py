"""Calling the user's eval_fn: its signature is read once, every call is counted, and the
result must be one finite real number."""
from __future__ import annotations

import inspect

from rapidquant.scoring import as_score, per_sample


def _needs_second_argument(fn) -> bool:
    """True when fn cannot be called with the model alone (e.g. def ev(model, num_samples))."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: call with the model alone
        return False
    try:
        sig.bind(object())
        return False
    except TypeError:
        sig.bind(object(), None)  # raises a clear TypeError if two arguments do not fit either
        return True


class Evaluator:
    """``Evaluator(eval_fn)(model, what)`` -> float; ``count`` is the number of calls so far."""

    def __init__(self, eval_fn):
        if not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable as eval_fn(model) -> float; got {type(eval_fn).__name__}")
        try:
            self._two_args = _needs_second_argument(eval_fn)
        except TypeError:
            raise TypeError("eval_fn must accept the model as its only required argument: "
                            "eval_fn(model) or eval_fn(model, num_samples=None)") from None
        self.fn = eval_fn
        self.count = 0

    def __call__(self, model, what: str) -> float:
        return self.samples(model, what)[0]

    def samples(self, model, what: str):
        """(score, per-sample scores or None) of one eval_fn call."""
        self.count += 1
        value = self.fn(model, None) if self._two_args else self.fn(model)
        return as_score(value, what), per_sample(value, what)
