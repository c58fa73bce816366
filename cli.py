"""The `planner` command: argument parsing and error reporting only; the work lives in `planner/`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump) and exit code 2."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def token_limit(text: str) -> int | None:
    """A positive token count, or 'all'."""
    return None if text == "all" else positive_int(text)


def build_parser() -> Parser:
    parser = Parser(prog="planner", description="Budget-driven compression planner for causal language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    ev = commands.add_parser("evaluate", help="measure a model's perplexity, latency and memory")
    ev.add_argument("--model", default="builtin:smollm2-135m",
                    help="builtin:NAME, a local Hugging Face folder, or a hub id (default: %(default)s)")
    ev.add_argument("--data", default="builtin:shakespeare",
                    help="builtin:NAME, a text file or folder, or a datasets name such as wikitext:wikitext-2-raw-v1")
    ev.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    ev.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16/float16 on CUDA), float32, float16, bfloat16")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    ev.add_argument("--context-length", type=positive_int, default=512, help="perplexity window (tokens)")
    ev.add_argument("--stride", type=positive_int, default=256, help="perplexity window stride (tokens)")
    ev.add_argument("--max-eval-tokens", type=token_limit, default=8192,
                    help="held-out tokens to score, spread over the held-out works, or 'all' (default: %(default)s)")
    ev.add_argument("--prompt-tokens", type=positive_int, default=128, help="latency: prefill prompt length")
    ev.add_argument("--new-tokens", type=positive_int, default=32, help="latency: decoded tokens per repeat")
    ev.add_argument("--repeats", type=positive_int, default=7, help="latency: measured repeats")
    ev.add_argument("--warmup", type=int, default=2, help="latency: unrecorded warm-up runs")
    ev.add_argument("--threads", type=positive_int, default=None, help="torch threads while timing (default: torch's)")
    ev.add_argument("--skip", action="append", default=[], choices=["perplexity", "latency", "memory"],
                    help="skip an evaluator (repeatable)")
    ev.add_argument("--json", type=Path, help="also write the figures to this JSON file")

    assets = commands.add_parser("assets", help="the built-in model and corpus")
    assets_commands = assets.add_subparsers(dest="assets_command", required=True, parser_class=Parser)
    assets_commands.add_parser("fetch", help="fetch and prepare every built-in asset (idempotent)")
    assets_commands.add_parser("list", help="list the built-in assets and whether they are cached")
    return parser


def cmd_evaluate(args) -> int:
    from evaluators.latency import LatencyProtocol
    from evaluators.perplexity import PerplexityProtocol
    from planner.errors import PlannerError
    from planner.evaluate import EvaluationSettings, evaluate, format_report
    from planner.sources import DataSource, ModelSource, load_corpus, load_model, resolve_device, resolve_dtype

    try:
        settings = EvaluationSettings(
            perplexity=PerplexityProtocol(args.context_length, args.stride, args.max_eval_tokens),
            latency=LatencyProtocol(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                    warmup=args.warmup, repeats=args.repeats, threads=args.threads),
            memory_prompt_tokens=args.prompt_tokens,
            skip=tuple(args.skip),
        )
    except ValueError as exc:
        raise PlannerError(str(exc)) from None
    check_writable(args.json)
    model_source = ModelSource.parse(args.model)
    data_source = DataSource.parse(args.data)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    # Read the corpus before the (slower) model load, so a bad corpus fails fast.
    corpus = load_corpus(data_source) if "perplexity" not in settings.skip else None
    model, tokenizer = load_model(model_source, device, dtype, trust_remote_code=args.trust_remote_code)
    try:
        report = evaluate(model, tokenizer, corpus, settings, args.model, device)
    except ValueError as exc:  # protocol vs model/corpus mismatch, e.g. a window longer than the model allows
        raise PlannerError(str(exc)) from None
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"figures written to {args.json}")
    return 0


def check_writable(path: Path | None) -> None:
    from planner.errors import PlannerError

    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PlannerError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PlannerError(f"cannot write {path}: folder {folder} is not writable")


def cmd_assets(args) -> int:
    from planner import assets

    for asset in assets.all_assets():
        if args.assets_command == "fetch":
            assets.ensure(asset)
        state = "cached" if assets.is_ready(asset) else "not fetched"
        print(f"builtin:{asset.name:<14} {asset.kind:<6} {state:<11} {asset.description}")
    print(f"cache: {assets.cache_root()}")
    return 0


COMMANDS = {"evaluate": cmd_evaluate, "assets": cmd_assets}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from planner.quiet import quiet_libraries

        quiet_libraries()
        from planner.errors import PlannerError

        try:
            return COMMANDS[args.command](args)
        except PlannerError as exc:
            raise UsageError(str(exc)) from None
    except UsageError as exc:
        print(f"planner: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("planner: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - never a traceback for the user; PLANNER_DEBUG shows it
        if os.environ.get("PLANNER_DEBUG"):
            raise
        detail = (str(exc).strip().splitlines() or [""])[0]
        print(f"planner: internal error: {type(exc).__name__}: {detail} (PLANNER_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
