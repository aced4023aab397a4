"""The registry of task kinds: the one place that lists them and says what each one is.

`head` is the model head the kind trains (SFT is a causal LM whose prompt tokens carry no
labels); `formats` the record formats it reads (the first is the default); `labelled` whether
its labels form a vocabulary (class names, BIO tags); `metric` / `mode` the default metric and
its direction; `loss` names the loss function in tenure.engine.tasks.losses; `pack` how `data.pack` packs
it: "stream" (causal LM rows filled from the example stream, tenure.engine.data.packing), "batch" (the
examples of each batch packed into fewer rows, one output per example,
tenure.engine.data.batch_packing), or None (the kind cannot pack).
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
    pack: str | None = None


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("seq_cls", "seq_cls", ("text_label",), True, "accuracy", "max", "classification", "batch"),
    Kind("pair_cls", "pair_cls", ("pair",), True, "accuracy", "max", "classification", "batch"),
    Kind("token_cls", "token_cls", ("token_tags",), True, "f1", "max", "token"),
    Kind("regression", "regression", ("text_target", "text_label", "pair"), False, "pearson", "max", "mse", "batch"),
    Kind("causal_lm", "causal_lm", ("text",), False, "perplexity", "min", "causal_lm", "stream"),
    Kind("sft", "causal_lm", ("prompt_completion", "chat"), False, "perplexity", "min", "causal_lm"),
    Kind("mlm", "mlm", ("text",), False, "perplexity", "min", "token"),
    Kind("embedding", "embedding", ("retrieval",), False, "recall@1", "max", "info_nce"),
    # lm-eval tasks scored on the run's causal LM, never trained (metric and direction: the harness's)
    Kind("lm_eval", "causal_lm", (), False, "", "max", "none"),
)}
HEADS = tuple(dict.fromkeys(k.head for k in KINDS.values()))


def head_of(kind: str) -> str:
    return KINDS[kind].head


def pack_error(kind: str) -> str | None:
    """The one-line `data.pack` error for a kind that cannot pack, else None."""
    if KINDS[kind].pack is not None:
        return None
    packable = ", ".join(k.name for k in KINDS.values() if k.pack)
    return (f"data.pack: task kind {kind!r} cannot pack its examples (packing applies to {packable}); "
            "set data.pack=false")
