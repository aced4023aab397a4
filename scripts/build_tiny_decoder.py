"""Build the from-scratch decoder of study 3 (docs/forgetting.md): an HF model directory with
config.json and tokenizer files but no weights, for `model.init: random`.

    .venv/bin/python scripts/build_tiny_decoder.py            # writes configs/forgetting/tiny_gpt2/

The tokenizer is a byte-level BPE trained here on corpus A's training split
(data/wordnet_text/train.jsonl), so it is part of "the model trained on A": B's prompts
("Define: <lemma>") are tokenised with it like any other text. The architecture is a GPT-2 of
2 layers, width 128, 4 heads, 64 positions, tied LM head, no dropout (a few hundred steps from
scratch: nothing to regularise). The build is deterministic: rerunning it rewrites the same files.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data/wordnet_text/train.jsonl"
OUT = ROOT / "configs/forgetting/tiny_gpt2"
VOCAB = 2048
EOS = "<|endoftext|>"
ARCH = dict(n_layer=2, n_embd=128, n_head=4, n_positions=64)


def corpus_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def build_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def hf_config(vocab_size: int, eos_id: int) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab_size,
        "n_positions": ARCH["n_positions"], "n_embd": ARCH["n_embd"], "n_layer": ARCH["n_layer"],
        "n_head": ARCH["n_head"], "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0,
        "initializer_range": 0.02, "tie_word_embeddings": True, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    tok = build_tokenizer(corpus_texts(CORPUS))
    eos_id = tok.token_to_id(EOS)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
                        "pad_token": EOS}
    (args.out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (args.out / "config.json").write_text(json.dumps(hf_config(tok.get_vocab_size(), eos_id), indent=2) + "\n")
    print(f"{args.out}: vocab {tok.get_vocab_size()}, {ARCH}")


if __name__ == "__main__":
    main()
