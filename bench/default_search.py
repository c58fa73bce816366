"""The default search against llama.cpp's presets, on a float model: does `planner search` with nothing but a
memory budget recommend a file more accurate than llama-quantize's preset of that size (issue 29)?

    .venv/bin/python bench/default_search.py [--model builtin:smollm2-135m-float] [--presets Q4_K_M,Q3_K_M]
        [--trials 20] [--threads 2] [--out bench/results/default_search]

For each preset P: llama-quantize P with the importance matrix a study computes (`targets/llamacpp/stock.py`, the
one every compared preset gets), measured by the presets' harness (`llamacpp_presets.measure_gguf`: KL over the
full vocabulary against the F32 GGUF, 4096 held-out positions, decode A/B); then, as a user would run them, in
their own processes,
    planner search --model M --data builtin:shakespeare --memory-budget <P's tensor bytes> \
                   --objectives kl,decode_ms_p50,weight_mb --trials N
    planner apply <its recipe> --out <folder>
(the default space: students, pruning with healing, rtn/gptq and llama-quant, on the llama.cpp target) and the
shipped model.gguf measured by the same harness. Reported per budget: KL and bytes against the preset's, the
search's wall time, the trials whose study KL is within 2x of the final front's best, and the time from the
study's first trial to the end of the recommended one. The model defaults to the built-in model moved off its
Q4_1 grid (`builtin:smollm2-135m-float`): on the built-in weights Q4_1/Q5_1/Q4_K requantize almost losslessly.
Figures, not assertions: rows to <out>.jsonl, the table to <out>.txt.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from llamacpp_presets import LATENCY, Reference, keep_row, measure_gguf  # noqa: E402

WITHIN = 2.0  # a trial "near the front": its KL within this factor of the final front's best


def planner(*argv: str, log: Path) -> float:
    """Run the planner CLI in its own process (as a user would), its output appended to `log`; wall seconds."""
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ planner {' '.join(argv)}\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                              cwd=Path(__file__).resolve().parents[1]).returncode
    if code != 0:
        raise SystemExit(f"planner {argv[0]} exited {code}: see {log}")
    return time.perf_counter() - started


def study_facts(storage: str, name: str) -> dict:
    """Trials near the front (study KL within WITHIN x the best measured) and time to the recommended trial."""
    import optuna

    from planner.budgets import Budget
    from planner.outcome import decide, measured
    from planner.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    trials = [t for t in study.get_trials(deepcopy=False) if measured(t) and "duplicate_of" not in t.user_attrs]
    kls = [t.user_attrs["metrics"]["kl"] for t in trials]
    budgets = [Budget(**b) for b in study.user_attrs["budgets"]]
    outcome = decide(study, budgets, study.user_attrs["baseline"])
    chosen = outcome.recommended
    first = min(t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start)
    return {"measured_trials": len(trials), "near_front": sum(k <= WITHIN * min(kls) for k in kls),
            "study_best_kl": min(kls), "recommended_trial": chosen.number if chosen else None,
            "recommended_label": chosen.user_attrs.get("label") if chosen else None,
            "seconds_to_recommended": (study.trials[chosen.number].datetime_complete - first).total_seconds()
            if chosen else None,
            "screened": sum("screened" in t.user_attrs for t in study.trials),
            "counted": sum(1 for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                           and "duplicate_of" not in t.user_attrs and "rejected" not in t.user_attrs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-float")
    parser.add_argument("--presets", default="Q4_K_M,Q3_K_M")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/default_search"))
    args = parser.parse_args()

    from planner.quiet import quiet_libraries
    from planner.sources import DataSource, ModelSource, load_corpus, load_model
    from search_spaces.base import BuildContext
    from targets.llamacpp import stock
    from targets.llamacpp.gguf_file import write_gguf

    quiet_libraries()
    torch.set_num_threads(args.threads)
    machine = {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cpus": os.cpu_count()}
    print(f"threads {args.threads}, CPU capability {machine['cpu_capability']}, load {os.getloadavg()[0]:.2f}",
          flush=True)
    subprocess.run([sys.executable, "-m", "cli", "assets", "fetch", args.model], check=True,
                   cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    model, tokenizer = load_model(ModelSource.parse(args.model), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl, log = args.out.with_suffix(".jsonl"), args.out.with_suffix(".log")
    jsonl.write_text("")
    log.write_text("")
    rows = []

    def record(row: dict) -> None:
        keep_row(rows, jsonl, row)
        print(f"{row['artifact']}: {row['mb']:.2f} MB, KL {row['kl']:.4f}, top-1 {row['top1']:.3f}, "
              f"ppl {row['perplexity']:.2f}, decode x {row.get('decode_ratio', float('nan')):.3f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="default-search-") as tmp:
        work = Path(tmp)
        f32 = work / "f32.gguf"
        write_gguf(model, tokenizer, f32, name="float benchmark model F32")
        reference = Reference.compute(f32, tokenizer, corpus.eval, 1)
        context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, seed=0, cache_dir=None)
        imatrix = stock.study_imatrix(model, context)  # what a study's compared presets get
        del model
        for preset in args.presets.split(","):
            path = work / f"{preset}.gguf"
            stock.quantize_preset(imatrix, f32, path, preset)
            preset_row = {"artifact": f"llama.cpp {preset} + imatrix", "preset": preset,
                          **measure_gguf(path, reference, args.threads, LATENCY), **machine}
            record(preset_row)
            path.unlink()
            name = f"default-{preset.lower()}"
            # kept beside the results, for `planner review`
            (args.out.parent / f"{name}.db").unlink(missing_ok=True)
            storage = f"sqlite:///{(args.out.parent / f'{name}.db').resolve()}"
            recipe, deploy = work / f"{name}.yaml", work / f"{name}-deploy"
            search_seconds = planner("search", "--model", args.model, "--data", "builtin:shakespeare",
                                     "--memory-budget", f"{preset_row['tensor_bytes'] / 1e6}MB",
                                     "--objectives", "kl,decode_ms_p50,weight_mb", "--trials", str(args.trials),
                                     "--study", name, "--storage", storage, "--recipe", str(recipe), log=log)
            facts = study_facts(storage, name)
            planner("apply", str(recipe), "--out", str(deploy), "--force", log=log)
            shipped = {"artifact": f"planner default search @{preset}", "preset": preset,
                       **measure_gguf(deploy / "model.gguf", reference, args.threads, LATENCY), **machine,
                       "search_seconds": search_seconds, "trials": args.trials, **facts}
            shipped["kl_vs_preset"] = shipped["kl"] / preset_row["kl"]
            shipped["bytes_vs_preset"] = shipped["tensor_bytes"] / preset_row["tensor_bytes"]
            record(shipped)
            print(f"@{preset}: KL {shipped['kl_vs_preset']:.3f}x the preset's at {shipped['bytes_vs_preset']:.3f}x its "
                  f"bytes; search {search_seconds / 60:.1f} min; {facts['near_front']} of {facts['measured_trials']} "
                  f"measured trials within {WITHIN:g}x of the best KL; recommended trial "
                  f"{facts['recommended_trial']} after {facts['seconds_to_recommended'] or 0:.0f} s", flush=True)
    lines = [f"{'budget':<8} {'preset KL':>9} {'planner KL':>10} {'KL x':>6} {'bytes x':>7} {'search min':>10} "
             f"{'near front':>10} {'to recommended s':>16}  recommended"]
    for preset in args.presets.split(","):
        base = next(r for r in rows if r["artifact"] == f"llama.cpp {preset} + imatrix")
        ours = next(r for r in rows if r["artifact"] == f"planner default search @{preset}")
        lines.append(f"{preset:<8} {base['kl']:9.4f} {ours['kl']:10.4f} {ours['kl_vs_preset']:6.3f} "
                     f"{ours['bytes_vs_preset']:7.3f} {ours['search_seconds'] / 60:10.1f} "
                     f"{ours['near_front']:>4} of {ours['measured_trials']:<3} {ours['seconds_to_recommended'] or 0:16.0f}"
                     f"  {ours['recommended_label']}")
    notes = (f"\nmodel {args.model}; threads {args.threads}, CPU capability {machine['cpu_capability']}, load "
             f"{os.getloadavg()[0]:.2f}; KL over the full vocabulary against the F32 GGUF ({rows[0]['positions']} "
             "held-out positions); each preset with the study's importance matrix; the search's own KL (its protocol: "
             "1536 tokens, top 512 + tail) decides 'near front'.\n")
    text = "\n".join(lines)
    print(text + notes)
    args.out.with_suffix(".txt").write_text(text + "\n" + notes)


if __name__ == "__main__":
    main()
