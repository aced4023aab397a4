"""The HF transformers PyTorch training loop that `tenure bench --compare torch` times.

Run in the torch environment (`make torch-env`), by `tenure bench`, as a subprocess:

    .torch-venv/bin/python scripts/bench_torch.py SPEC.json

SPEC.json: model_dir, init ("pretrained" | "random"), kind ("seq_cls" | "regression" |
"causal_lm" | "mlm"), num_labels, batches (an .npz of batch_0_input_ids, ...), dtype ("float32" |
"bfloat16": torch.autocast on CPU, fp32 master weights), dropout (null = the config's),
lr, betas, eps, weight_decay, clip_norm (null = off), total_steps, warmup, seed, lora (null, or
{rank, alpha, targets, dropout}: PEFT's LoRA on those modules, the base frozen). A model_dir that
is a .gguf file is loaded by transformers from the GGUF (dequantised, as tenure does).

The loop is the one a user writes: forward with labels (HF computes the loss), backward,
clip_grad_norm_, AdamW step (no weight decay on biases and norm weights, as tenure),
linear schedule, zero_grad. After building and `warmup` untimed steps it prints one JSON
line {"ready": ...}; then for each stdin line "run N" it runs N consecutive steps and prints
{"spans": [[start, end], ...], "loss": ..., "peak_rss_mb": ...}, each step's start and end on
time.monotonic (CLOCK_MONOTONIC, the clock `tenure bench` reads too); "quit" ends it.
"""
from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
import torch
import transformers

DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                  "embd_pdrop", "attn_pdrop", "resid_pdrop", "attention_dropout")


def build_model(spec):
    if spec["model_dir"].endswith(".gguf"):   # transformers reads the GGUF itself (needs the gguf package)
        directory, name = spec["model_dir"].rsplit("/", 1)
        spec = dict(spec, model_dir=directory)
        config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
        load = {"gguf_file": name}
    else:
        config = transformers.AutoConfig.from_pretrained(spec["model_dir"])
        load = {}
    if spec["dropout"] is not None:
        for name in DROPOUT_FIELDS:
            if hasattr(config, name):
                setattr(config, name, spec["dropout"])
    if spec["kind"] in ("causal_lm", "sft"):
        auto = transformers.AutoModelForCausalLM
    elif spec["kind"] == "mlm":
        auto = transformers.AutoModelForMaskedLM
    else:
        auto = transformers.AutoModelForSequenceClassification
        config.num_labels = 1 if spec["kind"] == "regression" else spec["num_labels"]
        if spec["kind"] == "regression":
            config.problem_type = "regression"
    if spec["init"] == "pretrained":
        model = auto.from_pretrained(spec["model_dir"], config=config, **load)
    else:
        torch.manual_seed(spec["seed"])
        model = auto.from_config(config)
    if spec.get("lora"):
        import peft
        lora = spec["lora"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                                           target_modules=lora["targets"],
                                                           lora_dropout=lora["dropout"]))
    return model


def no_decay(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "bias" or any("norm" in p.lower() or p.startswith("ln_") for p in parts[:-1])


def build_optimizer(model, spec):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": spec["weight_decay"]},
              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"])
    total, warmup = max(spec["total_steps"], 1), spec.get("warmup_steps", 0)
    linear = lambda s: s / max(warmup, 1) if s < warmup else max(0.0, (total - s) / max(total - warmup, 1))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear)


def load_batches(path, kind, model):
    data = np.load(path)
    count = len({k.split("_")[1] for k in data.files})
    takes_types = "token_type_ids" in model.forward.__code__.co_varnames and model.config.model_type != "gpt2"
    batches = []
    for i in range(count):
        b = {k[len(f"batch_{i}_"):]: data[k] for k in data.files if k.startswith(f"batch_{i}_")}
        inputs = {"input_ids": torch.from_numpy(b["input_ids"].astype(np.int64)),
                  "attention_mask": torch.from_numpy(b["attention_mask"].astype(np.int64))}
        if takes_types and "token_type_ids" in b:
            inputs["token_type_ids"] = torch.from_numpy(b["token_type_ids"].astype(np.int64))
        labels = b["labels"]
        inputs["labels"] = torch.from_numpy(labels.astype(np.float32 if kind == "regression" else np.int64))
        batches.append(inputs)
    return batches


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    start = time.perf_counter()
    model = build_model(spec)
    model.train()
    opt, sched = build_optimizer(model, spec)
    batches = load_batches(spec["batches"], spec["kind"], model)
    autocast = spec["dtype"] == "bfloat16"
    counter = [0]

    def step():
        batch = batches[counter[0] % len(batches)]
        counter[0] += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        if spec["clip_norm"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())

    setup = time.perf_counter() - start
    start = time.perf_counter()
    loss = None
    for _ in range(spec["warmup"]):
        loss = step()
    print(json.dumps({"ready": True, "setup_s": setup, "warmup_s": time.perf_counter() - start,
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "loss": loss}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        spans = []
        for _ in range(int(command[1])):
            start = time.monotonic()
            loss = step()
            spans.append([start, time.monotonic()])
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"spans": spans, "loss": loss, "peak_rss_mb": rss_mb}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
