"""Reference outputs of HF PyTorch for an HF model directory, on a fixed padded batch.

Run in the torch environment (Python 3.11, torch CPU, transformers 5.x):

    .torch-venv/bin/python scripts/hf_reference.py DIR OUT.npz

OUT.npz holds the inputs (input_ids, attention_mask, token_type_ids when the model takes
them) and the outputs: hidden_states [layers + 1, B, L, D] (HF's output_hidden_states),
logits when the class in config.json's `architectures` has a head, and `architecture`.
The batch is fixed: seeded ids, right padding with row lengths (12, 9, 5).
"""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

LENGTHS = (12, 9, 5)


def fixed_batch(config) -> dict[str, np.ndarray]:
    """Seeded token ids (never special ids 0..3), the pad id on padding, a second segment in row 0."""
    batch, length = len(LENGTHS), max(LENGTHS)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, config.vocab_size, size=(batch, length)).astype(np.int64)
    mask = (np.arange(length)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    pad_id = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    ids = np.where(mask == 1, ids, pad_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "type_vocab_size", 0) and config.type_vocab_size > 1:
        types = np.zeros_like(ids)
        types[0, LENGTHS[0] // 2:] = 1
        out["token_type_ids"] = types
    return out


def reference(model_dir: str | Path) -> dict[str, np.ndarray]:
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    arch = (config.architectures or ["AutoModel"])[0]
    model_cls = getattr(transformers, arch, None) or transformers.AutoModel
    model = model_cls.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = fixed_batch(config)
    accepted = inspect.signature(model.forward).parameters
    inputs = {k: torch.from_numpy(v) for k, v in batch.items() if k in accepted}
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, return_dict=True)
    result = {k: v.astype(np.int32) for k, v in batch.items() if k in accepted}
    result["hidden_states"] = np.stack([h.numpy() for h in out.hidden_states]).astype(np.float32)
    if getattr(out, "logits", None) is not None:
        result["logits"] = out.logits.numpy().astype(np.float32)
    if getattr(out, "pooler_output", None) is not None:
        result["pooler_output"] = out.pooler_output.numpy().astype(np.float32)
    result["architecture"] = np.array(arch)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: hf_reference.py DIR OUT.npz", file=sys.stderr)
        return 2
    result = reference(argv[0])
    np.savez_compressed(argv[1], **result)
    print(json.dumps({"architecture": str(result["architecture"]), "keys": sorted(result)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
