"""The registry of task kinds: the one place that lists them and says what each one is.

`head` is the model head the kind trains (SFT is a causal LM whose prompt tokens carry no
labels); `formats` the record formats it reads (the first is the default); `labelled` whether
its labels form a vocabulary (class names, BIO tags); `metric` / `mode` the default metric and
its direction; `loss` names the loss function in engine.losses.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    head: str
    formats: tuple[str, ...]
    labelled: bool
    metric: str
    mode: str
    loss: str


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("seq_cls", "seq_cls", ("text_label",), True, "accuracy", "max", "classification"),
    Kind("pair_cls", "pair_cls", ("pair",), True, "accuracy", "max", "classification"),
    Kind("token_cls", "token_cls", ("token_tags",), True, "f1", "max", "token"),
    Kind("regression", "regression", ("text_target", "text_label", "pair"), False, "pearson", "max", "mse"),
    Kind("causal_lm", "causal_lm", ("text",), False, "perplexity", "min", "causal_lm"),
    Kind("sft", "causal_lm", ("prompt_completion", "chat"), False, "perplexity", "min", "causal_lm"),
    Kind("mlm", "mlm", ("text",), False, "perplexity", "min", "token"),
    Kind("embedding", "embedding", ("retrieval",), False, "recall@1", "max", "info_nce"),
)}
HEADS = tuple(dict.fromkeys(k.head for k in KINDS.values()))


def head_of(kind: str) -> str:
    return KINDS[kind].head
