"""Engine vs HF PyTorch parity on one HF directory (what `tenure hf check DIR` runs).

Reference outputs come from the torch environment when it exists (scripts/hf_reference.py
in a subprocess), else from a committed `reference.npz` beside the weights (for the
package alias `minilm`, whose weights live in site-packages: tests/fixtures/minilm/).
A NaN or Inf in any compared output, ours or the reference, is a failure. Hidden states
and logits are compared at real (non-pad) tokens only: HF lets pad queries attend, we do
not, and nothing downstream reads pad positions.

Relative error of a tensor = max|engine - ref| / max|ref| (robust to near-zero entries).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from models.errors import TenureError
from models.hf import PACKAGE_ALIASES, load_hf, read_config, resolve_model_dir
from models.tasks import build_task_model, graft_pretrained

ROOT = Path(__file__).resolve().parents[1]
# Committed reference outputs for models that are not a directory of this repository.
COMMITTED_FIXTURES = {alias: ROOT / "tests" / "fixtures" / "minilm" / "reference.npz" for alias in PACKAGE_ALIASES}
KIND_BY_SUFFIX = (("ForSequenceClassification", "seq_cls"), ("ForTokenClassification", "token_cls"),
                  ("ForMaskedLM", "mlm"), ("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"))


def torch_python() -> Path | None:
    path = Path(os.environ.get("TENURE_TORCH_PYTHON", ROOT / ".torch-venv" / "bin" / "python"))
    return path if path.is_file() else None


def reference_outputs(model_dir: Path, prefer: str = "auto", fixture: Path | None = None) -> tuple[dict, str]:
    """(arrays, source) with source "torch" or the fixture path; TenureError when neither exists.

    `fixture`: where the committed reference.npz is when it is not beside the weights."""
    python = torch_python()
    if python is not None and prefer in ("auto", "torch"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "reference.npz"
            proc = subprocess.run([str(python), str(ROOT / "scripts" / "hf_reference.py"), str(model_dir), str(out)],
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                # Unreadable weights, or a config whose sizes disagree with them: the engine's own
                # load names the file or tensor (HF's last line points at a report it printed above).
                _engine_loads(model_dir)
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise TenureError(f"{model_dir}: HF reference run failed: {last} (its full output: "
                                  f"{python} scripts/hf_reference.py {model_dir} OUT.npz)")
            with np.load(out) as data:
                return dict(data), "torch"
    fixture = model_dir / "reference.npz" if fixture is None or not fixture.is_file() else fixture
    if prefer in ("auto", "fixture") and fixture.is_file():
        with np.load(fixture) as data:
            return dict(data), str(fixture)
    raise TenureError(f"{model_dir}: no reference outputs: create the torch environment (.torch-venv, "
                      "see scripts/hf_reference.py) or add reference.npz from it")


def _engine_loads(model_dir: Path) -> None:
    """Fits the weights to the shapes of the engine's model of config.json (traced, not compiled):
    a TenureError naming the file or tensor when they do not fit."""
    arch_cfg, backbone, head, _ = load_hf(model_dir, with_tokenizer=False)
    architecture = (read_config(model_dir).get("architectures") or [""])[0]
    num_labels = head["classifier"]["kernel"].shape[-1] if head and "classifier" in head else 2
    model = build_task_model(arch_cfg, task_kind_for(architecture), num_labels=num_labels,
                             pooling="cls" if hasattr(arch_cfg, "pooler") else "last")
    batch = {"input_ids": np.ones((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32)}
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), batch)["params"]))
    graft_pretrained(shapes, backbone, head)


def task_kind_for(architecture: str) -> str:
    for suffix, kind in KIND_BY_SUFFIX:
        if architecture.endswith(suffix):
            return kind
    return "embedding"


def engine_outputs(model_dir: Path, batch: dict, kind: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(hidden states [embeddings, layers_0 .. layers_{L-2}, final output], logits or None), fp32."""
    arch_cfg, backbone, head, _ = load_hf(model_dir, with_tokenizer=False)
    num_labels = head["classifier"]["kernel"].shape[-1] if head and "classifier" in head else 2
    pooling = "cls" if hasattr(arch_cfg, "pooler") else "last"
    model = build_task_model(arch_cfg, kind, num_labels=num_labels, pooling=pooling)
    params = nn.unbox(model.init(jax.random.key(0), batch)["params"])
    params = graft_pretrained(params, backbone, head)
    is_stage = lambda mdl, _: mdl.name in ("backbone", "embeddings") or (mdl.name or "").startswith("layers_")
    out, state = model.apply({"params": params}, batch, capture_intermediates=is_stage)
    stages = state["intermediates"]["backbone"]
    num_layers = sum(1 for k in stages if k.startswith("layers_"))
    hidden = [stages["embeddings"]["__call__"][0]]
    hidden += [stages[f"layers_{i}"]["__call__"][0] for i in range(num_layers - 1)]
    hidden.append(stages["__call__"][0])
    logits = out.get("logits") if kind != "embedding" else None
    return [np.asarray(h, np.float32) for h in hidden], None if logits is None else np.asarray(logits, np.float32)


def _diff(ours: np.ndarray, ref: np.ndarray, real: np.ndarray | None) -> tuple[float, float]:
    if ours.shape != ref.shape:
        raise TenureError(f"parity: engine shape {ours.shape} != reference shape {ref.shape}")
    if real is not None:
        ours, ref = ours[real], ref[real]
    max_abs = float(np.max(np.abs(ours - ref)))
    return max_abs, max_abs / max(float(np.max(np.abs(ref))), 1e-30)


@dataclasses.dataclass
class ParityReport:
    """checks: name -> (max_abs, max_rel); ok when every max_rel <= tolerance and no output
    (nonfinite: names of outputs with NaN/Inf at real tokens, ours or the reference) is non-finite."""

    architecture: str
    task_kind: str
    source: str
    tolerance: float
    checks: dict[str, tuple[float, float]]
    nonfinite: list[str] = dataclasses.field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max(a for a, _ in self.checks.values())

    @property
    def max_rel(self) -> float:
        return max(r for _, r in self.checks.values())

    @property
    def ok(self) -> bool:
        # `nan <= tolerance` is False, and max() over a NaN depends on order: check each.
        return not self.nonfinite and all(r <= self.tolerance for _, r in self.checks.values())

    def summary(self) -> str:
        lines = [f"{self.architecture} ({self.task_kind}) vs {self.source}"]
        lines += [f"  {name:<18} max_abs {a:.3e}  max_rel {r:.3e}" for name, (a, r) in self.checks.items()]
        if self.nonfinite:
            lines.append(f"FAIL: non-finite values (NaN/Inf) in {', '.join(self.nonfinite)}")
        else:
            lines.append(f"{'OK' if self.ok else 'FAIL'}: max_rel {self.max_rel:.3e} (tolerance {self.tolerance:.0e}), "
                         f"max_abs {self.max_abs:.3e}")
        return "\n".join(lines)


def _sentence_embeddings(model_dir: Path, batch: dict) -> np.ndarray:
    """The engine's mean-pooled, L2-normalised embeddings (what sentence-transformers gives)."""
    arch_cfg, backbone, head, _ = load_hf(model_dir, with_tokenizer=False)
    model = build_task_model(arch_cfg, "embedding", pooling="mean")
    params = graft_pretrained(nn.unbox(model.init(jax.random.key(0), batch)["params"]), backbone, head)
    return np.asarray(model.apply({"params": params}, batch)["embeddings"], np.float32)


def check_parity(path: str | Path, tolerance: float = 1e-4, prefer: str = "auto") -> ParityReport:
    """Compare engine and HF outputs on the reference batch; prefer: auto | torch | fixture.

    A reference with `hidden_states` (scripts/hf_reference.py) compares every hidden state and
    the logits at real tokens; one with only `embeddings` (the committed MiniLM fixture, from
    sentence-transformers) compares mean-pooled normalised sentence embeddings."""
    model_dir = resolve_model_dir(path)
    ref, source = reference_outputs(model_dir, prefer, COMMITTED_FIXTURES.get(str(path)))
    batch = {k: ref[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids") if k in ref}
    if "hidden_states" not in ref and "embeddings" in ref:
        architecture, kind = "sentence-transformers mean pooling", "embedding"
        outputs = {"embeddings": (_sentence_embeddings(model_dir, batch), ref["embeddings"], None)}
    elif "architecture" not in ref or "hidden_states" not in ref:
        raise TenureError(f"{source}: reference outputs need 'architecture' and 'hidden_states' (or 'embeddings')")
    else:
        architecture = str(ref["architecture"])
        kind = task_kind_for(architecture)
        hidden, logits = engine_outputs(model_dir, batch, kind)
        real = batch["attention_mask"].astype(bool)
        if len(hidden) != len(ref["hidden_states"]):
            raise TenureError(f"parity: engine has {len(hidden)} hidden states, HF {len(ref['hidden_states'])}")
        outputs = {f"hidden_states[{i}]": (ours, theirs, real)
                   for i, (ours, theirs) in enumerate(zip(hidden, ref["hidden_states"]))}
        if logits is not None and "logits" in ref:
            outputs["logits"] = (logits, ref["logits"], real if logits.ndim == 3 else None)
    checks = {name: _diff(ours, theirs, where) for name, (ours, theirs, where) in outputs.items()}
    nonfinite = []
    for name, (ours, theirs, where) in outputs.items():
        for who, array in (("engine", ours), ("reference", theirs)):
            if not np.all(np.isfinite(array if where is None else array[where])):
                nonfinite.append(f"{name} ({who})")
    return ParityReport(architecture, kind, source, tolerance, checks, nonfinite)


if __name__ == "__main__":
    result = check_parity(sys.argv[1])
    print(result.summary())
    sys.exit(0 if result.ok else 1)
