"""The `llmkern` command: `llmkern info`, `llmkern quantize`, `llmkern generate`, `llmkern train pretrain`,
`llmkern serve`, `llmkern bench serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Used when neither --max-new-tokens nor the checkpoint's generation_config sets a length.
DEFAULT_MAX_NEW_TOKENS = 256


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint directory (default: the built-in "
                   "demo-target, a small Python code model)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt (the user message with --chat)")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user message with the chat template")
    p.add_argument("--system", metavar="TEXT", help="a system message before the prompt (with --chat)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help=f"default: the checkpoint's max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}")
    p.add_argument("--temperature", type=float, metavar="T", help="0 is greedy (default: the checkpoint's "
                   "generation_config: its temperature if it sets do_sample, else greedy)")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--top-k", type=int, metavar="K")
    p.add_argument("--min-p", type=float, metavar="P", help="drop tokens below P x the top token's probability")
    p.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="> 1 discourages tokens of the prompt and output (transformers' rule)")
    p.add_argument("--seed", type=int, metavar="S", help="same seed, same output")
    add_dtype_and_quant_arguments(p)


def add_dtype_and_quant_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype and --quant: how `generate` and `serve` load the model."""
    p.add_argument("--quant", metavar="Q", help="quantize the linears at load time: nf4, int4 or int8")
    p.add_argument("--dtype", metavar="D", help="float32, bfloat16 or float16 (default: the checkpoint's)")


def resolve_model(args: argparse.Namespace, announce) -> None:
    """args.model: the --model directory, or the built-in demo-target (said through announce(path))."""
    if args.model is None:
        from llmkern.models import demo_model_path

        args.model = str(demo_model_path("demo-target"))
        announce(args.model)
    if not Path(args.model).is_dir():
        raise ValueError(f"--model: {args.model} is not a directory")


def check_dtype_and_quant(args: argparse.Namespace):
    """The --dtype flag as a torch.dtype (None: the checkpoint's); bad --dtype or --quant values raise, naming
    the flag, before any model loads."""
    from llmkern.llm import parse_dtype
    from llmkern.models.checkpoint import QUANT_CONFIGS

    try:
        dtype = parse_dtype(args.dtype)
    except ValueError:
        raise ValueError(f"--dtype: expected float32, bfloat16 or float16, got {args.dtype!r}") from None
    if args.quant is not None and args.quant not in QUANT_CONFIGS:
        raise ValueError(f"--quant: expected one of {', '.join(sorted(QUANT_CONFIGS))}, got {args.quant!r}")
    return dtype


def run_generate(args: argparse.Namespace) -> int:
    """Streams the generated text to stdout; prompt and decode speeds go to stderr (stdout stays the text)."""
    from llmkern.generation import SamplingParams
    from llmkern.llm import LLM

    # Bad arguments fail before the model loads.
    resolve_model(args, lambda path: print(f"llmkern generate: no --model given, using the built-in demo model "
                                           f"{path}", file=sys.stderr))
    dtype = check_dtype_and_quant(args)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    if args.system is not None and not args.chat:
        raise ValueError("--system: needs --chat (the system message goes through the chat template)")
    overrides = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is None:
            continue
        try:
            SamplingParams(**{name: value})  # its checks, with the flag's name
        except ValueError as e:
            raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
        overrides[name] = value
    llm = LLM(args.model, dtype=dtype, quant=args.quant)
    gc = llm.generation_config
    overrides["max_tokens"] = args.max_new_tokens or gc.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    params = gc.sampling_params(**overrides)
    if args.chat:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        ids = llm.chat_token_ids([*system, {"role": "user", "content": args.prompt}])[0]
        stream = llm.stream(params=params, prompt_token_ids=ids)
    else:
        stream = llm.stream(args.prompt, params)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    out = stream.output
    sys.stdout.write("\n")
    print(f"prompt: {out.num_prompt_tokens} tokens, {out.prompt_tokens_per_s:.1f} tokens/s; "
          f"decode: {out.num_generated_tokens} tokens, {out.decode_tokens_per_s:.1f} tokens/s "
          f"(finish: {out.finish_reason})", file=sys.stderr)
    return 0


def _bench_module(name: str):
    """bench/<name>.py of the source checkout llmkern runs from (the benchmarks are not part of the package)."""
    import importlib

    root = str(Path(__file__).resolve().parents[1])
    if not (Path(root) / "bench" / f"{name}.py").is_file():
        raise SystemExit(f"llmkern bench: {root}/bench/{name}.py not found; the benchmarks need a source checkout")
    if root not in sys.path:
        sys.path.append(root)
    return importlib.import_module(f"bench.{name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmkern")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, CPU ISA path, threads, CUDA kernels, registered ops")
    from llmkern.quant import convert

    convert.add_arguments(sub.add_parser("quantize", help="quantize a safetensors checkpoint directory "
                                         "(same as python -m llmkern.quant)"))
    add_generate_arguments(sub.add_parser("generate", help="generate text from a prompt, streamed to stdout"))
    train = sub.add_parser("train", help="train a model").add_subparsers(dest="trainer", required=True)
    from llmkern.train import pretrain

    pretrain.add_arguments(train.add_parser("pretrain", help="pretrain on the standard-library corpus"))
    from llmkern.serve import server

    server.add_arguments(sub.add_parser("serve", help="the OpenAI-compatible HTTP server (default: the demo model "
                                        "on 127.0.0.1:8000)"))
    bench = sub.add_parser("bench", help="benchmarks (from a source checkout: they live in bench/)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # only `llmkern bench` imports the benchmarks (not every server start)
        bench_serve = _bench_module("bench_serve")
        bench_serve.add_arguments(bench.add_subparsers(dest="benchmark", required=True).add_parser(
            "serve", help="serving benchmark of llmkern serve (same as python -m bench.bench_serve)"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        raise SystemExit(bench_serve.run(args))
    if args.command == "info":
        from llmkern.info import main as info_main

        info_main()
    elif args.command == "quantize":
        raise SystemExit(convert.run(args))
    elif args.command == "train":
        try:
            raise SystemExit(pretrain.run(args))
        except (ValueError, FileNotFoundError) as e:
            print(f"llmkern train: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    elif args.command == "serve":
        try:
            raise SystemExit(server.run(args))
        except (ValueError, FileNotFoundError) as e:  # bad flags: one line, no traceback
            print(f"llmkern serve: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:  # Ctrl-C before the model was loaded (after, the server drains and exits 0)
            print(file=sys.stderr)
            raise SystemExit(130) from None
    elif args.command == "generate":
        try:
            raise SystemExit(run_generate(args))
        except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
            print(f"llmkern generate: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print(file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()
