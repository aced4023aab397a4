"""Build the GGUF fixtures: tiny random llama / qwen2 models written with gguf's own writer, each
beside its HF twin (the same weights as an HF safetensors directory).

    python scripts/fixtures_gguf.py                  # writes tests/fixtures/gguf/ (no torch needed)
    .torch-venv/bin/python scripts/gguf_reference.py tests/fixtures/gguf/NAME.gguf \\
        tests/fixtures/gguf/NAME.reference.npz       # HF transformers' reading of each file

What tests/test_gguf.py checks with them: the engine reads NAME.gguf to the same logits as
NAME.hf/ (through the HF loader) and as transformers does (NAME.reference.npz). This script
writes the files the way llama.cpp's converter does, independently of models/gguf.py: for
llama, the q and k rows of each head go from HF's rotate-half order (half, pair) to
interleaved pairs (pair, half); qwen2 files keep HF's order. A quantised file's twin holds the
dequantised values (quantisation works on whole rows, which the permutation only reorders).

Variants: llama MHA untied F32; llama GQA tied Q8_0; qwen2 GQA tied F16 (q/k/v bias);
qwen2 MHA untied Q4_0 (q/k/v bias). tokenizer.json is the byte-level BPE all of them carry.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gguf"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: pad, bos, eos
VOCAB, WIDTH, MLP, LAYERS, HEADS, CONTEXT = 288, 32, 64, 2, 4, 64
CORPUS = ["the quick brown fox jumps over the lazy dog", "a tiny model learns to forget what it once knew",
          "fine tuning changes weights; regularisers keep them near the start"] * 20
VARIANTS = {
    "llama_f32": dict(arch="llama", kv_heads=4, tied=False, qtype=gguf.GGMLQuantizationType.F32,
                      theta=10000.0, eps=1e-5),
    "llama_gqa_q8_0": dict(arch="llama", kv_heads=2, tied=True, qtype=gguf.GGMLQuantizationType.Q8_0,
                           theta=10000.0, eps=1e-5),
    "qwen2_gqa_f16": dict(arch="qwen2", kv_heads=2, tied=True, qtype=gguf.GGMLQuantizationType.F16,
                          theta=1000000.0, eps=1e-6),
    "qwen2_q4_0": dict(arch="qwen2", kv_heads=4, tied=False, qtype=gguf.GGMLQuantizationType.Q4_0,
                       theta=1000000.0, eps=1e-6),
}


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    assert tokenizer.get_vocab_size() == VOCAB, tokenizer.get_vocab_size()
    return tokenizer


def hf_weights(rng: np.random.Generator, v: dict) -> dict[str, np.ndarray]:
    """Random HF-named, HF-layout ([out, in]) fp32 tensors."""
    head_dim = WIDTH // HEADS
    kv = v["kv_heads"] * head_dim
    normal = lambda *shape: rng.normal(0.0, 0.3, shape).astype(np.float32)  # noqa: E731
    out = {"model.embed_tokens.weight": normal(VOCAB, WIDTH), "model.norm.weight": 1 + normal(WIDTH) / 3}
    if not v["tied"]:
        out["lm_head.weight"] = normal(VOCAB, WIDTH)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": 1 + normal(WIDTH) / 3,
                    p + "post_attention_layernorm.weight": 1 + normal(WIDTH) / 3,
                    p + "self_attn.q_proj.weight": normal(WIDTH, WIDTH), p + "self_attn.k_proj.weight": normal(kv, WIDTH),
                    p + "self_attn.v_proj.weight": normal(kv, WIDTH), p + "self_attn.o_proj.weight": normal(WIDTH, WIDTH),
                    p + "mlp.gate_proj.weight": normal(MLP, WIDTH), p + "mlp.up_proj.weight": normal(MLP, WIDTH),
                    p + "mlp.down_proj.weight": normal(WIDTH, MLP)})
        if v["arch"] == "qwen2":
            out.update({p + "self_attn.q_proj.bias": normal(WIDTH), p + "self_attn.k_proj.bias": normal(kv),
                        p + "self_attn.v_proj.bias": normal(kv)})
    return out


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows (half h, pair j) -> (pair j, half h): what llama.cpp's converter writes."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, rest = hf.split(".", 3)
    short = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{short[module]}.{kind}"


def write_variant(name: str, v: dict, tokenizer: Tokenizer, rng: np.random.Generator) -> None:
    qtype = v["qtype"]
    tensors = hf_weights(rng, v)
    writer = gguf.GGUFWriter(str(OUT / f"{name}.gguf"), v["arch"])
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(WIDTH)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(v["kv_heads"])
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_rope_freq_base(v["theta"])
    writer.add_layer_norm_rms_eps(v["eps"])
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_pad_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    twin = {}
    for hf, values in tensors.items():
        if values.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.quantize(values, qtype)
            values = gguf.quants.dequantize(data, qtype).astype(np.float32)
            raw = qtype
        elif values.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16:
            data, raw = values.astype(np.float16), None
            values = data.astype(np.float32)
        else:
            data, raw = values, None
        twin[hf] = values
        if v["arch"] == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            heads = HEADS if ".q_proj." in hf else v["kv_heads"]
            data = llama_cpp_permute(data, heads)  # whole rows: quantised blocks move unchanged
        writer.add_tensor(gguf_name(hf), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    directory = OUT / f"{name}.hf"
    directory.mkdir(parents=True, exist_ok=True)
    save_file(twin, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": v["arch"], "architectures": [("Llama" if v["arch"] == "llama" else "Qwen2") + "ForCausalLM"],
              "vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": v["kv_heads"], "max_position_embeddings": CONTEXT,
              "rms_norm_eps": v["eps"], "tie_word_embeddings": v["tied"], "hidden_act": "silu",
              "rope_parameters": {"rope_type": "default", "rope_theta": v["theta"]},
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(OUT / "tokenizer.json"))
    rng = np.random.default_rng(22)
    for name, variant in VARIANTS.items():
        write_variant(name, variant, tokenizer, rng)
        print(f"wrote {OUT / name}.gguf and {name}.hf/")


if __name__ == "__main__":
    main()
