"""The task kinds: one object per kind, one module each; the rest of the engine asks the kind
(`KINDS[name]`) instead of comparing kind names. Adding a kind is its module, its test and one
line here. What a kind answers: tenure.engine.tasks.kinds.base."""
from __future__ import annotations

from tenure.engine.tasks.kinds import (causal_lm, embedding, lm_eval, mlm, pair_cls, regression, seq_cls, sft,
                                       token_cls)
from tenure.engine.tasks.kinds.base import LOWER_IS_BETTER, TaskKind, unknown_kind

KINDS: dict[str, TaskKind] = {module.KIND.name: module.KIND for module in (
    seq_cls, pair_cls, token_cls, regression, causal_lm, sft, mlm, embedding, lm_eval)}

# The model head lm-eval's harness scores (a causal LM)
HARNESS_HEAD = lm_eval.KIND.head
# The model heads with an LM head over the vocabulary (kept from the pretrained model)
VOCAB_HEADS = frozenset(kind.head for kind in KINDS.values() if kind.vocab_head)


def kind_of(name: str) -> TaskKind:
    """The kind called `name`; TenureError naming the known ones otherwise."""
    if name not in KINDS:
        raise unknown_kind(name, KINDS)
    return KINDS[name]


def pack_error(name: str) -> str | None:
    """The one-line `data.pack` error for a kind that cannot pack, else None."""
    if KINDS[name].pack is not None:
        return None
    packable = ", ".join(k.name for k in KINDS.values() if k.pack)
    return (f"data.pack: task kind {name!r} cannot pack its examples (packing applies to {packable}); "
            "set data.pack=false")


__all__ = ["KINDS", "LOWER_IS_BETTER", "HARNESS_HEAD", "TaskKind", "VOCAB_HEADS", "kind_of", "pack_error"]
