"""The `planner` command: argument parsing and error reporting only; the work lives in `planner/`."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

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


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got '{text}'") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {value}")
    return value


def token_limit(text: str) -> int | None:
    """A positive token count, or 'all'."""
    return None if text == "all" else positive_int(text)


def add_study_flags(parser: argparse.ArgumentParser) -> None:
    """The settings of a study, shared by `search` and `create`; each can also come from --study-file."""
    parser.add_argument("--study-file", type=Path, help="a .toml or .yaml file of settings; flags override it")
    parser.add_argument("--model", help="builtin:NAME, a local folder or a hub id (default: builtin:smollm2-135m)")
    parser.add_argument("--data", help="builtin:NAME, a text file or folder, or a datasets name "
                                       "(default: builtin:shakespeare)")
    parser.add_argument("--study", help="study name (default: planner)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies/<study>.db)")
    parser.add_argument("--sampler", help="tpe (default), nsga2 or random")
    parser.add_argument("--seed", type=int, help="sampler and build seed (default: 0)")
    parser.add_argument("--trials", type=positive_int, help="trials the study should hold in total (default: 20)")
    parser.add_argument("--timeout", type=float, help="end the search within this many seconds from its start: no "
                        "trial starts after it, nor one the study's own trials predict to run past it")
    parser.add_argument("--latency-budget", help="decode time per token, p50: e.g. 25ms or 0.7x (of the baseline)")
    parser.add_argument("--prefill-budget", help="prefill time of the latency prompt: e.g. 200ms or 0.8x")
    parser.add_argument("--memory-budget", help="stored weight size: e.g. 300MB, 1.5GiB or 0.5x")
    parser.add_argument("--objectives", help="what the study minimises, comma-separated, the accuracy first: "
                                             "perplexity or kl, then decode_ms_p50, weight_mb, ... "
                                             "(default: perplexity,decode_ms_p50,weight_mb)")
    parser.add_argument("--target", help="where candidates ship and are measured: auto (default: llama.cpp on a CPU "
                                         "for the models it serves, else transformers), llama.cpp, transformers, vllm")
    parser.add_argument("--compare", help="the target's stock tool measured beside the candidates, comma-separated: "
                        "llama-quantize presets on llama.cpp, e.g. Q4_K_M,Q4_0 (with the study's importance matrix)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", help="auto (default), float32, float16, bfloat16")
    parser.add_argument("--trust-remote-code", action="store_true", default=None, help="allow a hub model's own code")
    parser.add_argument("--recipe", help="where to write the recommended recipe (default: studies/<study>-recipe.yaml)")


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
    ev.add_argument("--threads", type=positive_int, default=None,
                    help="threads while timing: torch's intra-op count, or llama.cpp's decode and prefill counts "
                         "(default: torch's current count; llama-cpp-python's defaults, half the CPUs for decode)")
    ev.add_argument("--skip", action="append", default=[], choices=["perplexity", "latency", "memory"],
                    help="skip an evaluator (repeatable)")
    ev.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ev.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own warnings and bars")

    se = commands.add_parser("search", help="search for the best compressed model that meets a budget")
    add_study_flags(se)
    se.add_argument("-q", "--quiet", action="store_true", help="no per-trial lines or progress bar")
    se.add_argument("-v", "--verbose", action="store_true", help="show build progress (e.g. distillation loss) and the libraries' own warnings and bars")

    cr = commands.add_parser("create", help="create a study (baseline measured, settings stored) for workers to run")
    add_study_flags(cr)  # here --timeout is the study's: no worker starts a trial once it has passed

    wk = commands.add_parser("worker", help="join a study and run its trials until it holds its trial count")
    wk.add_argument("--study", required=True)
    wk.add_argument("--storage", required=True, help="the study's Optuna storage URL (shared by every worker)")
    wk.add_argument("--trials", type=positive_int, help="override the study's trial count")
    wk.add_argument("--timeout", type=float, help="this worker's time, counted as search's --timeout")
    wk.add_argument("--seed", type=int, help="sampler seed of this worker (default: a different one per process)")
    wk.add_argument("--device", help="where this worker builds and measures (default: the study's)")
    wk.add_argument("-q", "--quiet", action="store_true", help="no per-trial lines or progress bar")
    wk.add_argument("-v", "--verbose", action="store_true", help="show build progress (e.g. distillation loss) and the libraries' own warnings and bars")

    ex = commands.add_parser("export", help="write the recipe of a trial (default: the recommended one)")
    ex.add_argument("--study", required=True)
    ex.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies/<study>.db)")
    ex.add_argument("--trial", type=int, help="trial number (default: the recommended candidate)")
    ex.add_argument("-o", "--output", type=Path, required=True, help="recipe file to write")

    ap = commands.add_parser("apply", help="rebuild a recipe's candidate, check it, and save a checkpoint")
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and the recipe")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--target", help="the recipe's own target (default); another one is refused")
    ap.add_argument("--force", action="store_true", help="write into a non-empty folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="show build progress and the libraries' own output")

    rv = commands.add_parser("review", help="list the studies in a storage, or show one study's front")
    rv.add_argument("--study", help="the study to show (default: list the studies, in every studies/*.db "
                                    "when no --storage is given)")
    rv.add_argument("--storage", help="Optuna storage URL (default: sqlite:///studies/<study>.db)")
    rv.add_argument("--json", action="store_true", help="print JSON for scripts")
    rv.add_argument("--html", type=Path, help="also write a report with Pareto plots and parameter importances")
    rv.add_argument("--dashboard", action="store_true", help="serve the study in optuna-dashboard until Ctrl-C")
    rv.add_argument("--host", default="127.0.0.1", help="--dashboard: address to listen on (default: loopback)")
    rv.add_argument("--port", type=port_number, default=8080, help="--dashboard: port (default: %(default)s; "
                                                                   "0 takes a free one)")
    rv.add_argument("-v", "--verbose", action="store_true", help="--dashboard: log every HTTP request")

    assets = commands.add_parser("assets", help="the built-in model and corpus")
    assets_commands = assets.add_subparsers(dest="assets_command", required=True, parser_class=Parser)
    fetch = assets_commands.add_parser("fetch", help="fetch and prepare the built-in assets (idempotent): the "
                                       "default model and corpus, or those named")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="e.g. builtin:smollm2-135m-float")
    assets_commands.add_parser("list", help="list the built-in assets and whether they are cached")
    return parser


def cmd_evaluate(args) -> int:
    from evaluators.latency import LatencyProtocol
    from evaluators.perplexity import PerplexityProtocol
    from planner.errors import PlannerError, check_writable
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
    if args.json:
        check_writable(args.json, "figures file")
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


def cmd_assets(args) -> int:
    from planner import assets

    named = [assets.named(name) for name in getattr(args, "names", None) or []]
    for asset in assets.all_assets():
        if args.assets_command == "fetch" and (asset in named if named else asset.default):
            assets.ensure(asset)
        state = "cached" if assets.is_ready(asset) else "not fetched"
        print(f"builtin:{asset.name:<18} {asset.kind:<6} {state:<11} {asset.description}")
    print(f"cache: {assets.cache_root()}")
    return 0


# Every study setting has its flag (add_study_flags), except the tables only a study file holds.
FILE_ONLY_SETTINGS = ("space", "evaluation")


def _study_settings(args):
    from dataclasses import fields

    from planner.settings import StudySettings, make_settings, read_study_file
    from planner.study import check_recipe_path

    file_values = read_study_file(args.study_file) if args.study_file else {}
    flags = [f.name for f in fields(StudySettings) if f.name not in FILE_ONLY_SETTINGS]
    settings = make_settings(file_values, {name: getattr(args, name) for name in flags})
    settings.budgets()  # a malformed budget fails here, before anything is loaded or stored
    if args.command == "search":
        check_recipe_path(settings)
    return settings


def cmd_search(args) -> int:
    from planner.study import run_search

    settings = _study_settings(args)
    return _finish(run_search(settings, verbose=args.verbose, quiet=args.quiet), settings.recipe_path())


def cmd_create(args) -> int:
    from planner.study import create, storage_url

    settings = _study_settings(args)
    study = create(settings)
    url = storage_url(settings)
    print(f"study '{study.study_name}' is ready in {url}: {len(study.trials)} candidates queued, "
          f"{settings.trials} trials to run. Start workers with\n"
          f"  planner worker --study {study.study_name} --storage {url}")
    return 0


def cmd_worker(args) -> int:
    import random

    from planner.study import join_as_worker, run_study

    began = time.monotonic()
    # Workers that share a seed would propose the same candidates at the same moment.
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    overrides = {"trials": args.trials, "timeout": args.timeout, "seed": seed, "device": args.device}
    study, bench = join_as_worker(args.study, args.storage, {k: v for k, v in overrides.items() if v is not None},
                                  args.verbose)
    return _finish(run_study(study, bench, quiet=args.quiet, began=began), recipe=None)


def _finish(outcome, recipe: Path | None) -> int:
    """Print the outcome and write the recommended recipe (if a path is given). Exit 1 when none meets the budget."""
    from planner.recipes import write_recipe
    from planner.report import format_outcome

    print(format_outcome(outcome))
    if outcome.recommended is None:
        print("no recipe written: no candidate meets the budget" if recipe else "no candidate meets the budget")
        return 1
    if not recipe:
        return 0
    path = write_recipe(outcome.study, outcome.recommended, recipe)
    print(f"recipe of trial {outcome.recommended.number} written to {path}")
    return 0


def cmd_export(args) -> int:
    from planner.errors import check_writable
    from planner.outcome import trial_to_export
    from planner.recipes import write_recipe
    from planner.study import load_stored

    check_writable(args.output, "recipe")
    study = load_stored(args.study, args.storage)
    trial = trial_to_export(study, args.trial)
    print(f"recipe of trial {trial.number} written to {write_recipe(study, trial, args.output)}")
    return 0


def cmd_apply(args) -> int:
    from planner.apply import apply_recipe

    result = apply_recipe(args.recipe, args.out, device=args.device, force=args.force, verbose=args.verbose,
                          target=args.target)
    print(f"shipped {result.artifact} for {result.target}, loaded fresh and re-measured: perplexity "
          f"{result.perplexity:.3f} (recipe {_shown(result.recorded_perplexity)}), {result.weight_bytes} bytes stored "
          f"(recipe {result.recorded_weight_bytes})")
    if result.decode_ratio is not None:
        from evaluators.paired import shown

        low, high = result.decode_interval or (result.decode_ratio, result.decode_ratio)
        rounds = f", {result.decode_rounds} rounds" if result.decode_rounds else ""
        print(f"decode {result.decode_ms:.2f} ms/token, {shown(result.decode_ratio, low, high, result.confidence)} "
              f"the uncompressed model in the same run{rounds} (recipe {_shown(result.recorded_decode_ratio)}x)"
              + (f"; {result.budget_note}" if result.budget_note else ""))
    print(f"artifact and recipe in {result.folder}; {result.how_to_load}")
    return 0


def _shown(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_review(args) -> int:
    from planner.errors import PlannerError, check_writable
    from planner.report import format_review, outcome_to_dict

    if args.study is None:
        if args.html or args.dashboard:
            raise PlannerError(f"review {'--html' if args.html else '--dashboard'} needs --study NAME")
        from planner.storage import list_studies

        rows = list_studies(args.storage)
        print(json.dumps(rows, indent=2) if args.json else
              "\n".join(f"{r['study']:<30} {r['trials']:>5} trials  {r['storage']}" for r in rows) or "no studies")
        return 0
    if args.html:
        check_writable(args.html, "report")
    if args.dashboard:
        from planner.dashboard import serve
        from planner.storage import default_storage_url

        serve(args.storage or default_storage_url(args.study), args.study, args.host, args.port, args.verbose)
        return 0
    from planner.outcome import stored_outcome
    from planner.study import load_stored

    outcome = stored_outcome(load_stored(args.study, args.storage))
    print(json.dumps(outcome_to_dict(outcome), indent=2) if args.json else format_review(outcome))
    if args.html:
        from planner.html_report import write_html_report

        print(f"report written to {write_html_report(outcome, args.html)}", file=sys.stderr if args.json else sys.stdout)
    return 0


COMMANDS = {"evaluate": cmd_evaluate, "search": cmd_search, "create": cmd_create, "worker": cmd_worker,
            "export": cmd_export, "apply": cmd_apply, "review": cmd_review, "assets": cmd_assets}


@contextlib.contextmanager
def stopped_on_termination() -> Iterator[None]:
    """A termination signal (`kill`, a scheduler ending a job) stops the command as Ctrl-C does: the trial in
    progress is noted and runs again on the next start, and the exit hooks run (the default action skips them,
    and left the llama.cpp target's work folder behind: gigabytes a study on a 1B model). The handler before is
    put back after (main() also runs inside other programs: the tests)."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: list[str] | None = None) -> int:
    with stopped_on_termination():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from planner.quiet import quiet_libraries

        quiet_libraries(verbose=getattr(args, "verbose", False))
        from planner.errors import PlannerError

        try:
            return COMMANDS[args.command](args)
        except PlannerError as exc:
            if exc.exit_code != EXIT_USAGE:
                print(f"planner: {exc}", file=sys.stderr)
                return exc.exit_code
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
        from planner.errors import first_line

        print(f"planner: internal error: {type(exc).__name__}: {first_line(exc)} (PLANNER_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
