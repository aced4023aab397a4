"""`tenure` command line: train, eval, data inspect, hf check / export.

User errors (`TenureError`) print as one line on stderr and exit with code 2; heavy
imports happen inside each command so `tenure --help` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from tenure.engine.tools.argtypes import number
from tenure.models.errors import TenureError


def _with_compilation_cache() -> None:
    """Train and eval keep their compiled steps in the persistent cache (engine/runtime/xla_env.py): the
    next run with the same shapes, a study's other arms, a resume, skip those compiles."""
    from tenure.engine.runtime.xla_env import enable_compilation_cache
    enable_compilation_cache()


def _cmd_train(args) -> int:
    from tenure.engine.config.schema import load_config
    from tenure.engine.train.trainer import train
    _with_compilation_cache()
    train(load_config(args.config, args.overrides), restart=args.restart, overwrite=args.overwrite)
    return 0


def _cmd_eval(args) -> int:
    from tenure.engine.config.schema import load_config
    from tenure.engine.tools.commands import evaluate_checkpoint
    _with_compilation_cache()
    evaluate_checkpoint(load_config(args.config, args.overrides), args.checkpoint, args.split)
    return 0


def _cmd_data_inspect(args) -> int:
    from tenure.engine.config.schema import load_config
    from tenure.engine.data.inspect import inspect_config
    from tenure.models.hf import load_tokenizer, resolve_model_dir
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(resolve_model_dir(cfg.model.path))
    print(inspect_config(cfg, tokenizer))
    return 0


def _cmd_lm_eval(args) -> int:
    from tenure.engine.tasks.lm_eval_adapter import run_harness
    _with_compilation_cache()
    return run_harness(args.lm_eval_args)


def _cmd_hf_check(args) -> int:
    from tenure.models.parity import check_parity
    report = check_parity(args.dir, tolerance=args.tolerance)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_export(args) -> int:
    from tenure.engine.config.schema import load_config
    from tenure.engine.tools.commands import export_checkpoint
    from tenure.models.gguf import check_gguf_target
    from tenure.models.hf import check_export_target
    if args.format == "gguf":  # refuse before restoring anything
        if args.lora_adapter:
            raise TenureError("export: --lora-adapter writes a PEFT adapter directory; a GGUF export merges LoRA")
        check_gguf_target(args.out, force=args.force)
    else:
        if args.gguf_type != "f16":
            raise TenureError("export: --gguf-type applies to --format gguf")
        check_export_target(args.out, force=args.force)
    export_checkpoint(load_config(args.config, args.overrides), args.checkpoint, args.out,
                      merge_lora=not args.lora_adapter, force=args.force, fmt=args.format, gguf_type=args.gguf_type)
    return 0


def _cmd_interpolate(args) -> int:
    from tenure.engine.continual.interpolate import interpolate, parse_alphas
    if args.alphas is None and args.export is None:
        raise TenureError("interpolate: give --alphas (the curve) and/or --export ALPHA --out DIR")
    if args.out is not None and args.export is None:  # it was ignored: the curve went to its default dir
        raise TenureError("interpolate: --out is where --export ALPHA writes its weights; the curve's directory "
                          "is --out-dir")
    _with_compilation_cache()
    interpolate(args.run_dir, parse_alphas(args.alphas) if args.alphas is not None else None, stage=args.stage,
                start=args.start, out_dir=args.out_dir, export=args.export, export_out=args.out, force=args.force,
                as_run=args.as_run)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenure",
        description="Fine-tune pretrained transformers in JAX and measure what they forget.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p):
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value",  # default: not listed as required
                       help="config overrides, e.g. train.steps=100 optim.lr=3e-5")
        return p

    p = with_config(sub.add_parser("train", help="fine-tune a model as the config says"))
    p.add_argument("--restart", action="store_true",
                   help="start over: move the run dir's earlier files aside (to <run_dir>.old-<time>) first, "
                        "and those of a checkpoint.dir outside it")
    p.add_argument("--overwrite", action="store_true",
                   help="when the run starts over (train.resume=false, or no checkpoint to resume from), replace "
                        "an earlier run in the run dir in place (its checkpoints are deleted) instead of refusing")
    p.set_defaults(fn=_cmd_train)

    p = with_config(sub.add_parser("eval", help="evaluate a checkpoint or HF directory"))
    p.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoint dir, step dir or HF model directory")
    p.add_argument("--split", default="test", choices=["validation", "test"])
    p.set_defaults(fn=_cmd_eval)

    p = with_config(sub.add_parser("export", help="write a checkpoint as an HF model directory or a GGUF file"))
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or step dir")
    p.add_argument("--out", required=True, help="output HF directory (or FILE.gguf with --format gguf)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="gguf: one llama.cpp file (causal LMs that started from a GGUF model.path)")
    p.add_argument("--gguf-type", choices=["f16", "bf16", "q8_0"], default="f16",
                   help="tensor type of a GGUF export's matrices (norms and biases stay f32)")
    p.add_argument("--lora-adapter", action="store_true",
                   help="write LoRA as a PEFT adapter instead of merging it")
    p.add_argument("--force", action="store_true", help="replace an existing HF model directory (or GGUF file) at --out")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("interpolate", help="score a finished run along theta(a) = (1-a) theta_start + a theta_end "
                                           "(no training), and export a chosen point")
    p.add_argument("run_dir", help="a finished run's directory")
    p.add_argument("--alphas", help="comma-separated a in [0, 1], e.g. 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    p.add_argument("--stage", type=int, default=None, help="the stage to interpolate (default: the last)")
    p.add_argument("--start", choices=["stage", "run"], default="stage",
                   help="theta_start: the weights the stage started from (default), or the run's starting model")
    p.add_argument("--out-dir", help="where the curve goes (default: RUN_DIR/interpolation)")
    p.add_argument("--export", type=float, metavar="ALPHA", help="write theta(ALPHA) as an HF model directory")
    p.add_argument("--out", help="the HF directory --export writes")
    p.add_argument("--force", action="store_true", help="replace an existing HF model directory at --out, "
                                                        "or the results of a run at --as-run")
    p.add_argument("--as-run", metavar="DIR", help="write the run as it ends at theta(a) (one alpha, the last "
                                                   "stage) to DIR, as `tenure study` tabulates a trained run")
    p.set_defaults(fn=_cmd_interpolate)

    data = sub.add_parser("data", help="data tools").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND")
    p = with_config(data.add_parser(
        "inspect", help="counts, labels, lengths, duplicates and bad records per split"))
    p.set_defaults(fn=_cmd_data_inspect)

    from tenure.engine.tools.bench import add_bench_parser
    from tenure.engine.study import add_study_parser
    add_bench_parser(sub)
    add_study_parser(sub)
    from tenure.engine.tools.preflight import add_parser as add_launch_parser
    add_launch_parser(sub, with_config)
    from tenure.engine.tools.aot import add_parser as add_compile_parser
    add_compile_parser(sub, with_config)

    # Listed here for --help; main() hands everything after `lm-eval` to lm-eval's own parser.
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness with the model 'tenure' (checkpoint=RUN_DIR|HF_DIR|GGUF) and "
                        "the probes of data/probes: tenure lm-eval --model tenure --model_args checkpoint=... "
                        "--tasks tenure_probes")

    hf = sub.add_parser("hf", help="Hugging Face model directories").add_subparsers(
        dest="hf_command", required=True, metavar="HF_COMMAND")
    p = hf.add_parser("check", help="compare the engine's forward pass with HF PyTorch")
    p.add_argument("dir", help="HF model directory (config.json + *.safetensors), a .gguf file, or 'minilm' / 'smollm2'")
    p.add_argument("--tolerance", type=number(float, 0), default=1e-4, help="max relative error allowed")
    p.set_defaults(fn=_cmd_hf_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # the rest is lm-eval's command line, read by its own parser
        args, extra = argparse.Namespace(fn=_cmd_lm_eval, lm_eval_args=argv[1:]), []
    else:
        args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`eval CFG --checkpoint P key=value`); argparse leaves them over.
    unknown = [token for token in extra if "=" not in token or token.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except TenureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # I/O the engine did not wrap: still one line naming path and cause
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: 130; a study stopped by SIGTERM: 143, as `tenure train`
        code = getattr(exc, "exit_code", 130)
        print("stopped by SIGTERM" if code == 143 else "interrupted", file=sys.stderr)
        return code


def entry() -> None:
    """The `tenure` command: main(), then leave without the interpreter's teardown. At exit JAX
    destroys its compiled executables, and this jaxlib's CPU runtime aborts (object_pool.h
    "Check failed: available_.size() == num_created_") when one is destroyed with a computation
    still in flight, e.g. one whose result nothing waited for: a finished run must not end with
    exit code -6. Everything the run wrote (checkpoints, logs, exports) is closed by main() by now."""
    from tenure.engine.runtime.host_memory import keep_freed_memory
    try:
        keep_freed_memory()  # before JAX starts its threads
    except TenureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    code = main()
    if "jax" not in sys.modules:  # a command that never touched JAX ends as usual
        sys.exit(code)
    import jax
    from jax._src import distributed as jax_distributed
    for array in jax.live_arrays():
        array.block_until_ready()
    if jax_distributed.global_state.client is not None:
        jax.distributed.shutdown()  # the peers' shutdown barrier still sees this process leave
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
