"""The `llmkern` command: `llmkern info`, `llmkern quantize` (more arrive with serving, training and bench)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmkern")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, torch, CPU ISA path, threads, CUDA kernels, registered ops")
    from llmkern.quant import convert

    convert.add_arguments(sub.add_parser("quantize", help="quantize a safetensors checkpoint directory "
                                         "(same as python -m llmkern.quant)"))
    args = parser.parse_args(argv)
    if args.command == "info":
        from llmkern.info import main as info_main

        info_main()
    elif args.command == "quantize":
        raise SystemExit(convert.run(args))


if __name__ == "__main__":
    main()
