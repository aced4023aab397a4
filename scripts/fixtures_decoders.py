"""Build the decoder parity fixtures (tiny random HF models + PyTorch reference outputs).

Run in the torch environment (Python 3.11, torch CPU, transformers 5.x):

    .torch-venv/bin/python scripts/fixtures_decoders.py            # writes tests/fixtures/<family>/
    .torch-venv/bin/python scripts/fixtures_decoders.py check DIR...  # load exported dirs, JSON per dir

Each fixture dir is a complete HF directory (config.json, model.safetensors, tokenizer files)
plus `reference.npz`: a right-padded forward batch with its logits and every hidden state,
and a left-padded prompt batch with HF's greedy `generate(do_sample=False)` continuation.
The `check` mode is what tests/test_hf_decoders.py uses to prove an exported directory loads
in transformers with no missing/unexpected keys and reproduces the fixture logits.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
VOCAB = 320
FORWARD_LENGTHS = (12, 9, 5)   # right padding: row lengths in a [3, 12] batch
PROMPT_LENGTHS = (7, 5, 3)     # left padding: row lengths in a [3, 7] prompt batch
MAX_NEW_TOKENS = 6
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model learns to forget what it once knew",
    "fine tuning changes weights; regularisers keep them near the start",
    "tokens flow through attention, then through the feed forward block",
    "packing puts two short examples in one row with separate positions",
] * 20

FAMILIES = {
    "gpt2": dict(
        specials=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>",
        cls=transformers.GPT2Config,
        kwargs=dict(n_positions=64, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new"),
    ),
    # GQA (4 query heads over 2 kv heads), explicit head_dim != hidden/heads, llama3 rope scaling
    # with original_max_position_embeddings chosen so all three frequency bands occur, untied head.
    "llama": dict(
        specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad="</s>",
        cls=transformers.LlamaConfig,
        kwargs=dict(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=32),
        ),
    ),
    # q/k/v bias (no o bias), tied embeddings, large rope_theta.
    "qwen2": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
        pad="<|endoftext|>",
        cls=transformers.Qwen2Config,
        kwargs=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    ),
    # one kv head (MQA) and a sliding window shorter than the fixture rows.
    "mistral": dict(
        specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad="</s>",
        cls=transformers.MistralConfig,
        kwargs=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=64, sliding_window=5,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
}


def build_tokenizer(spec: dict) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS, wrapped so save_pretrained writes a full HF tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"], pad_token=spec["pad"],
    )


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter so norms, biases and every mapped tensor are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def forward_batch(tokenizer, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [3, 12] batch: rows of different lengths cut from the tokenized corpus."""
    ids = tokenizer(" ".join(CORPUS[:5]))["input_ids"]
    L = max(FORWARD_LENGTHS)
    input_ids = np.full((len(FORWARD_LENGTHS), L), pad_id, np.int32)
    mask = np.zeros_like(input_ids)
    for row, n in enumerate(FORWARD_LENGTHS):
        start = 7 * row
        input_ids[row, :n] = ids[start:start + n]
        mask[row, :n] = 1
    return input_ids, mask


def prompt_batch(tokenizer, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded [3, 7] prompt batch (the layout HF generate expects for decoders)."""
    ids = tokenizer(" ".join(CORPUS[5:10]))["input_ids"]
    L = max(PROMPT_LENGTHS)
    input_ids = np.full((len(PROMPT_LENGTHS), L), pad_id, np.int32)
    mask = np.zeros_like(input_ids)
    for row, n in enumerate(PROMPT_LENGTHS):
        start = 11 * row + 3
        input_ids[row, L - n:] = ids[start:start + n]
        mask[row, L - n:] = 1
    return input_ids, mask


def greedy(model, prompt_ids, prompt_mask, eos_id, pad_id) -> np.ndarray:
    out = model.generate(
        input_ids=torch.tensor(prompt_ids, dtype=torch.long),
        attention_mask=torch.tensor(prompt_mask, dtype=torch.long),
        max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    new = out[:, prompt_ids.shape[1]:].numpy().astype(np.int32)
    # HF stops early once every row has finished; pad to a fixed width like the engine does.
    return np.pad(new, ((0, 0), (0, MAX_NEW_TOKENS - new.shape[1])), constant_values=pad_id)


def min_greedy_margin(model, prompt_ids, prompt_mask, new_ids) -> float:
    """Smallest top-1 minus top-2 logit gap along the greedy path (guards against argmax ties)."""
    ids = np.concatenate([prompt_ids, new_ids], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(new_ids)], axis=1)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
    L = prompt_ids.shape[1]
    step_logits = logits[:, L - 1:L - 1 + new_ids.shape[1]]
    top2 = np.sort(step_logits, axis=-1)[..., -2:]
    return float((top2[..., 1] - top2[..., 0]).min())


def build_family(name: str, spec: dict, seed: int) -> None:
    torch.manual_seed(seed)
    out_dir = FIXTURES / name
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    bos_id = tokenizer.convert_tokens_to_ids(spec["bos"]) if spec["bos"] else None
    eos_id = tokenizer.convert_tokens_to_ids(spec["eos"])
    pad_id = tokenizer.convert_tokens_to_ids(spec["pad"])
    config = spec["cls"](vocab_size=len(tokenizer), bos_token_id=bos_id, eos_token_id=eos_id,
                         pad_token_id=pad_id, **spec["kwargs"])
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    perturb_(model, seed)

    input_ids, mask = forward_batch(tokenizer, pad_id)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    output_hidden_states=True)
    hidden = np.stack([h.numpy() for h in out.hidden_states])

    prompt_ids, prompt_mask = prompt_batch(tokenizer, pad_id)
    # Use as eos a token the model emits mid-continuation, so the test sees a row stop early.
    free_run = greedy(model, prompt_ids, prompt_mask, eos_id=None, pad_id=pad_id)
    gen_eos = int(free_run[0, 2])
    new_ids = greedy(model, prompt_ids, prompt_mask, eos_id=gen_eos, pad_id=pad_id)
    margin = min_greedy_margin(model, prompt_ids, prompt_mask, free_run)
    assert margin > 1e-3, f"{name}: greedy path has a near tie ({margin}); change the seed"

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    np.savez_compressed(
        out_dir / "reference.npz",
        input_ids=input_ids, attention_mask=mask, logits=out.logits.numpy(), hidden_states=hidden,
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, generate_eos_id=np.int32(gen_eos),
        generate_pad_id=np.int32(pad_id), generated_ids=new_ids, free_run_ids=free_run,
    )
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params, eos for generate={gen_eos}, "
          f"min greedy margin {margin:.3f}, generated {new_ids.tolist()}")


def check_export(export_dir: str) -> None:
    """Load an engine-exported HF dir in transformers; print loading info and logits on its reference batch."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        export_dir, output_loading_info=True, attn_implementation="eager")
    ref = np.load(Path(export_dir) / "reference.npz")
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor(ref["input_ids"], dtype=torch.long),
                              attention_mask=torch.tensor(ref["attention_mask"])).logits.numpy()
    real = ref["attention_mask"].astype(bool)
    err = np.abs(logits - ref["logits"])[real].max() / np.abs(ref["logits"][real]).max()
    print(json.dumps({
        "missing_keys": sorted(info["missing_keys"]), "unexpected_keys": sorted(info["unexpected_keys"]),
        "mismatched_keys": [list(map(str, k)) for k in info.get("mismatched_keys", [])],
        "model_class": type(model).__name__, "logits_rel_err": float(err),
    }))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) >= 3 and sys.argv[1] == "check":
        for export_dir in sys.argv[2:]:
            check_export(export_dir)
        return
    torch.use_deterministic_algorithms(True)
    for seed, (name, spec) in enumerate(FAMILIES.items()):
        build_family(name, spec, seed=1000 + seed)


if __name__ == "__main__":
    main()
