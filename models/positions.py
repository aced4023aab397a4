"""How long an input each architecture can take: `data.max_length` (and `tenure bench`'s
`bench.length`) checked against the model before anything is built (past a learned position
table, a JAX gather returns NaN, and the run would later blame the learning rate)."""
from __future__ import annotations

from tenure.models.errors import TenureError


def max_positions(arch) -> tuple[int | None, bool]:
    """(the longest input in tokens, whether that is a hard limit).

    BERT-style encoders and GPT-2 have a learned position table (hard); RoBERTa numbers
    positions from pad_token_id + 1, which uses up `position_offset` rows. RoPE models
    (Llama family) have no table: `max_position_embeddings` is the trained context, and
    longer inputs run but extrapolate (soft)."""
    name = type(arch).__name__
    if name == "BertConfig":
        return arch.max_position_embeddings - arch.position_offset, True
    if name == "GPT2Config":
        return arch.max_positions, True
    if hasattr(arch, "max_position_embeddings"):
        return arch.max_position_embeddings, False
    return None, False


def check_max_length(arch, max_length: int, key: str = "data.max_length") -> str | None:
    """Raises TenureError when `max_length` (the config key `key`) exceeds a learned position
    table; returns a warning line when it exceeds a RoPE model's trained context; None when it fits."""
    limit, hard = max_positions(arch)
    if limit is None or max_length <= limit:
        return None
    model = getattr(arch, "model_type", None) or type(arch).__name__.removesuffix("Config").lower()
    if hard:
        raise TenureError(f"{key} {max_length} is longer than the {limit} positions this {model} "
                          f"model has (its position table); set {key} <= {limit}")
    return (f"warning: {key} {max_length} is longer than the {limit}-token context this {model} "
            "model was trained with; RoPE extrapolates past it, usually badly")
