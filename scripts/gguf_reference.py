"""HF transformers' reading of a GGUF file: the reference `tenure hf check FILE.gguf` and
tests/test_gguf.py compare the engine against.

Run in the torch environment (.torch-venv: torch CPU, transformers, gguf):

    .torch-venv/bin/python scripts/gguf_reference.py FILE.gguf OUT.npz

transformers dequantises the tensors and undoes llama.cpp's q/k permutation itself
(modeling_gguf_pytorch_utils) and builds the tokenizer from the same metadata; the model runs
in float32. OUT.npz holds: architecture, prompts, input_ids / attention_mask (a right-padded
batch of PROMPTS as the GGUF's tokenizer encodes them), last_logits [B, V] (fp32 logits at each
row's last real token) and num_parameters (each stored tensor counted once).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ("The capital of France is", "def add(a, b):\n    return a + b  # 42 apples")


def reference(path: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    rows = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in PROMPTS]
    length = max(len(row) for row in rows)
    input_ids = np.zeros((len(rows), length), np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask)).logits
    last = attention_mask.sum(1) - 1
    return {"architecture": np.array(type(model).__name__), "prompts": np.array(PROMPTS),
            "input_ids": input_ids, "attention_mask": attention_mask,
            "last_logits": logits[np.arange(len(rows)), last].float().numpy(),
            "num_parameters": np.array(sum(p.numel() for p in model.parameters()))}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: gguf_reference.py FILE.gguf OUT.npz")
    np.savez(sys.argv[2], **reference(Path(sys.argv[1])))
