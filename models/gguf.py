"""GGUF files (llama.cpp / ollama's format) in and out, for the llama and qwen2 architectures.

  is_gguf(path) -> bool                  a path whose name ends in .gguf
  hf_config(path) -> dict                the file's metadata as HF config.json fields
  load_gguf(path, with_tokenizer=True, with_weights=True)
                                      -> (arch_cfg, backbone_params, head_params_or_None, tokenizer_or_None)
  check_gguf_target(path, force=False) -> Path
  export_gguf(path, arch_cfg, params, task_kind, source, dtype="f16", lora=None)

Loading goes through the HF Llama family (models/hf_llama.py): the metadata becomes the
config.json fields `config_from_hf` reads, and the tensors become HF-named, HF-layout fp32
arrays that `params_from_hf` maps, so a GGUF model and its HF twin are one param tree.

Every difference from the HF layout, stated once:
- names: token_embd / output_norm / output and blk.{i}.{attn_norm, attn_q/k/v/output,
  ffn_norm, ffn_gate/up/down} (TENSOR_NAMES); numpy views of GGUF tensors are already [out, in].
- llama (not qwen2): llama.cpp's converter permutes the rows of q and k (weights and biases)
  from HF's rotate-half RoPE layout to interleaved pairs: per head, row (pair j, half h) moves
  to 2*j + h. `_unpermute` undoes it on load and `_permute` redoes it on export.
- quantised tensors are dequantised to fp32 by gguf.quants.dequantize; the tokenizer is rebuilt
  from tokenizer.ggml.* by transformers' GGUF tokenizer converter (no torch needed).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from tenure.models.errors import TenureError

ARCHITECTURES = ("llama", "qwen2")
LAYER_TENSORS = {  # GGUF name within blk.{i} -> HF name within model.layers.{i}
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
EXPORT_TYPES = ("f16", "bf16", "q8_0")
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


# -- reading ------------------------------------------------------------------------------------
# Parsed files by path, with the (size, mtime) they were parsed at. Parsing SmolLM2's metadata (its
# 49k-token vocabulary, element by element) takes 4-6 s, which a study worker's every run paid
# again; the reader maps the file read-only, so keeping it costs no copy of the weights.
_READERS: dict[Path, tuple[tuple[int, int], Any]] = {}
_KEPT_READERS = 4


def _reader(path: Path):
    import gguf
    if not path.is_file():
        raise TenureError(f"{path}: GGUF file not found")
    stat = path.stat()
    version, key = (stat.st_size, stat.st_mtime_ns), path.resolve()
    if key in _READERS and _READERS[key][0] == version:
        return _READERS[key][1]
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TenureError(f"{path}: not a readable GGUF file ({reason}); it is truncated, corrupt or not GGUF") from None
    _READERS.pop(key, None)
    _READERS[key] = (version, reader)
    while len(_READERS) > _KEPT_READERS:  # the least recently parsed go
        _READERS.pop(next(iter(_READERS)))
    return reader


def _field(reader, path: Path, key: str, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise TenureError(f"{path}: GGUF metadata {key!r} is missing")
        return default
    return field.contents()


def _architecture(reader, path: Path) -> str:
    arch = _field(reader, path, "general.architecture")
    if arch not in ARCHITECTURES:
        raise TenureError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


def _config(reader, path: Path) -> dict:
    """HF config.json fields (what models/hf_llama.config_from_hf reads) from the metadata."""
    arch = _architecture(reader, path)
    get = lambda key, default=...: _field(reader, path, f"{arch}.{key}", default)  # noqa: E731
    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise TenureError(f"{path}: GGUF rope scaling {scaling!r} is not supported (only unscaled RoPE)")
    names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise TenureError(f"{path}: GGUF tensor 'token_embd.weight' is missing")
    heads, width = int(get("attention.head_count")), int(get("embedding_length"))
    config = {
        "model_type": arch, "vocab_size": int(embedding.shape[1]), "hidden_size": width,
        "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", get("rope.dimension_count", width // heads))),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rms_norm_eps": _decimal(get("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default", "rope_theta": _decimal(get("rope.freq_base", 10000.0))},
        "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in names,
    }
    for key in ("bos", "eos", "padding"):
        token_id = _field(reader, path, f"tokenizer.ggml.{key}_token_id", None)
        config[f"{'pad' if key == 'padding' else key}_token_id"] = None if token_id is None else int(token_id)
    return config


def _decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06: the value the model was configured with, in config.json on export)."""
    return float(str(np.float32(value)))


def hf_config(path: str | Path) -> dict:
    """The file's metadata as HF config.json fields; TenureError naming the file and the cause."""
    path = Path(path)
    return _config(_reader(path), path)


def _dequantised(tensor, path: Path) -> np.ndarray:
    """fp32 values of a tensor, shaped as numpy views GGUF data ([out, in] for a matrix)."""
    from gguf import GGMLQuantizationType, quants
    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            values = np.asarray(tensor.data, np.float32)
        else:
            values = quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        name = getattr(qtype, "name", qtype)
        raise TenureError(f"{path}: tensor {tensor.name!r} has quantisation type {name}, which the gguf reader "
                          "cannot dequantise") from None
    values = np.asarray(values, np.float32).reshape(shape)
    if not np.isfinite(values).all():  # a NaN the first batch may never reach (an unused vocabulary row)
        raise TenureError(f"{path}: tensor {tensor.name!r} holds non-finite values (NaN or Inf); the "
                          "weights are damaged: download or convert them again")
    return values


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (what its converter writes for llama):
    per head, rows [half, pair] become [pair, half]."""
    halves = weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
    return halves.swapaxes(1, 2).reshape(weights.shape)


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaved rows -> HF rotate-half rows (the inverse of `_permute`)."""
    pairs = weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weights.shape)


def _hf_tensors(reader, path: Path, config: dict) -> dict[str, np.ndarray]:
    """HF-named fp32 tensors in HF layout (llama's q/k rows un-permuted)."""
    out = {}
    for tensor in reader.tensors:
        match = _LAYER_NAME.fullmatch(tensor.name)
        name = (f"model.layers.{match[1]}.{LAYER_TENSORS[match[2]]}" if match and match[2] in LAYER_TENSORS
                else GLOBAL_TENSORS.get(tensor.name))
        if name is None:
            raise TenureError(f"{path}: GGUF tensor {tensor.name!r} has no place in a {config['model_type']} model")
        values = _dequantised(tensor, path)
        if config["model_type"] == "llama" and match and match[2].startswith(("attn_q.", "attn_k.")):
            heads = config["num_attention_heads" if match[2].startswith("attn_q.") else "num_key_value_heads"]
            values = _unpermute(values, heads)
        out[name] = values
    return out


def _tokenizer(reader, path: Path):
    """A PreTrainedTokenizerFast rebuilt from tokenizer.ggml.* by transformers' converter."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    if reader.get_field("tokenizer.ggml.tokens") is None:
        raise TenureError(f"{path}: the GGUF file carries no tokenizer (no tokenizer.ggml.tokens)")
    grouped = {group: {name: _field(reader, path, f"tokenizer.{key}")
                       for key, name in renames.items() if reader.get_field(f"tokenizer.{key}") is not None}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, init = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # A sentencepiece vocabulary without the flag (older files): llama.cpp and transformers add BOS
        init.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    try:
        backend, _ = convert_gguf_tokenizer(_architecture(reader, path), tokenizer_dict)
    except BaseException as err:  # noqa: BLE001 -- malformed merges panic in the tokenizers extension
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TenureError(f"{path}: cannot build the tokenizer from its GGUF metadata ({reason})") from None
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")):
        if tokenizer_dict.get(key) is not None:
            init[name] = tokens[int(tokenizer_dict[key])]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **init)


def load_gguf(path: str | Path, with_tokenizer: bool = True,
              with_weights: bool = True) -> tuple[Any, dict, dict | None, Any]:
    """(arch_cfg, backbone_params, head_params_or_None, tokenizer_or_None), as tenure.models.hf.load_hf."""
    from tenure.models import hf_llama
    path = Path(path)
    reader = _reader(path)
    config = _config(reader, path)
    arch_cfg = hf_llama.config_from_hf(config)
    tokenizer = _tokenizer(reader, path) if with_tokenizer else None
    if not with_weights:
        return arch_cfg, {}, None, tokenizer
    try:
        loaded = hf_llama.params_from_hf(_hf_tensors(reader, path, config), arch_cfg)
    except TenureError as err:  # "model.safetensors: missing tensor ..." names the HF side
        raise TenureError(f"{path}: {str(err).split(': ', 1)[-1]}") from None
    return arch_cfg, loaded["backbone"], loaded["head"], tokenizer


# -- writing ------------------------------------------------------------------------------------
def _gguf_tensors(hf_tensors: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """HF-named tensors -> GGUF-named ones (llama's q/k rows permuted as llama.cpp expects)."""
    to_gguf = {hf: gguf for gguf, hf in GLOBAL_TENSORS.items()}
    out = {}
    for name, values in hf_tensors.items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match:
            short = next(g for g, h in LAYER_TENSORS.items() if h == match[2])
            if cfg.model_type == "llama" and short.startswith(("attn_q.", "attn_k.")):
                values = _permute(values, cfg.num_heads if short.startswith("attn_q.") else cfg.num_kv_heads)
            out[f"blk.{match[1]}.{short}"] = values
        else:
            out[to_gguf[name]] = values
    return out


def _encoded(values: np.ndarray, dtype: str, name: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors (norms, biases) stay F32 as
    llama.cpp's converter keeps them, and Q8_0 needs rows of whole 32-value blocks."""
    from gguf import GGMLQuantizationType, quants
    values = np.ascontiguousarray(values, np.float32)
    if values.ndim == 1:
        return values, None
    if dtype == "f16":
        return values.astype(np.float16), None
    qtype = GGMLQuantizationType.BF16 if dtype == "bf16" else GGMLQuantizationType.Q8_0
    if qtype == GGMLQuantizationType.Q8_0 and values.shape[-1] % 32:
        raise TenureError(f"export: tensor {name!r} has rows of {values.shape[-1]} values, not a multiple of "
                          "Q8_0's block of 32; export it as f16 or bf16")
    return quants.quantize(values, qtype), qtype


def _copy_field(writer, field) -> None:
    from gguf import GGUFValueType
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1])
    else:
        writer.add_key_value(field.name, field.contents(), kind)


def check_gguf_target(out: str | Path, force: bool = False) -> Path:
    """Refuses a GGUF export target before any work: a name without .gguf, a directory, or an
    existing file unless `force`."""
    out = Path(out)
    if not is_gguf(out):
        raise TenureError(f"export: --out {out}: a GGUF export is one file named *.gguf")
    if out.is_dir():
        raise TenureError(f"export: {out} is a directory")
    if out.exists() and not force:
        raise TenureError(f"export: {out} exists; pass --force to replace it")
    return out


def export_gguf(out: str | Path, arch_cfg, params: dict, task_kind: str, source: str | Path,
                dtype: str = "f16", lora=None) -> Path:
    """Write a causal LM as a GGUF file (LoRA adapters merged) whose tokenizer metadata is copied
    from `source`, the GGUF the run started from. Written beside `out` and renamed into place, so
    a failed export leaves `out` as it was."""
    import gguf
    import jax
    import flax.linen as nn
    from tenure.models import hf_llama
    from tenure.models.lora import lora_paths, merge_lora, strip_lora
    out, source = Path(out), Path(source)
    if task_kind != "causal_lm":
        raise TenureError(f"export: a {task_kind} model has no LM head; GGUF export takes causal LM "
                          "models (causal_lm, sft)")
    params = jax.tree.map(np.asarray, nn.unbox(params))
    params = merge_lora(params, lora) if lora is not None and lora_paths(params) else strip_lora(params)
    if dtype not in EXPORT_TYPES:
        raise TenureError(f"export: GGUF type {dtype!r} is not supported (choose from {', '.join(EXPORT_TYPES)})")
    if not is_gguf(source):
        raise TenureError(f"export: a GGUF export takes its tokenizer from the GGUF the model came from; "
                          f"model.path {source} is not a .gguf file")
    if arch_cfg.model_type not in ARCHITECTURES or arch_cfg.sliding_window is not None:
        raise TenureError(f"export: a {arch_cfg.model_type} model"
                          f"{' with a sliding window' if arch_cfg.sliding_window is not None else ''} "
                          "cannot be written as GGUF (llama and qwen2 without sliding windows only)")
    if arch_cfg.rope.rope_type != "default":
        raise TenureError(f"export: RoPE scaling {arch_cfg.rope.rope_type!r} cannot be written as GGUF")
    reader = _reader(source)
    tensors = _gguf_tensors(hf_llama.params_to_hf(params, arch_cfg, "causal_lm"), arch_cfg)
    encoded = {name: _encoded(values, dtype, name) for name, values in tensors.items()}
    arch = arch_cfg.model_type
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_block_count(arch_cfg.num_layers)
        writer.add_context_length(arch_cfg.max_position_embeddings)
        writer.add_embedding_length(arch_cfg.hidden_size)
        writer.add_feed_forward_length(arch_cfg.intermediate_size)
        writer.add_head_count(arch_cfg.num_heads)
        writer.add_head_count_kv(arch_cfg.num_kv_heads)
        writer.add_key_length(arch_cfg.head_dim)
        writer.add_value_length(arch_cfg.head_dim)
        writer.add_rope_dimension_count(arch_cfg.head_dim)
        writer.add_rope_freq_base(arch_cfg.rope.theta)
        writer.add_layer_norm_rms_eps(arch_cfg.rms_norm_eps)
        writer.add_vocab_size(arch_cfg.vocab_size)
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                _copy_field(writer, field)
        for name, (data, raw_dtype) in encoded.items():
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise TenureError(f"export to {out} failed: {err.strerror or err}; {out} was left as it was") from None
    return out

