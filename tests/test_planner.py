"""End to end on a tiny model: search -> recipe -> export -> apply -> review, resume, budgets, bad input."""
import json
import os
import shutil

import optuna
import pytest
import yaml

import cli
from planner.storage import open_storage

@pytest.fixture
def study(tiny_study_file):
    return tiny_study_file


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def load(tmp_path):
    return optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))


def test_search_export_apply_review(study, tmp_path, text_corpus_dir, capsys, monkeypatch):
    # dynamic-int8 candidates have no checkpoint format transformers loads (apply says so): keep the
    # recommended candidate deployable whatever the tiny random model's perplexities come out as.
    study.write_text(study.read_text().replace('"dynamic-int8"', '"gptq"'))
    code, out, err = run(["search", "--study-file", study, "--trials", "6", "--memory-budget", "0.8x", "-q"], capsys)
    assert code == 0, out + err
    assert "Pareto front" in out and "recipe of trial" in out
    stored = load(tmp_path)
    # --trials counts distinct candidates: twins and spec rejections are drawn on top, and say so.
    counted = [t for t in stored.trials if not {"duplicate_of", "rejected"} & set(t.user_attrs)]
    assert len(counted) == 6 and len(stored.trials) <= 6 * 4
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    recommended = recipe["provenance"]["trial"]
    trial = stored.trials[recommended]
    limit = stored.user_attrs["budgets"][0]["limit"]
    assert trial.user_attrs["metrics"]["weight_bytes"] <= limit  # the recommendation meets the budget
    assert recipe["stages"] and recipe["metrics"]["perplexity"]["protocol"]["context_length"] == 64
    # A group size some layers cannot use is stated: marked in the label, listed per layer on the trial and
    # in the recipe (the tiny model's 32-wide layers cannot take groups of 64 or 128).
    for t in stored.trials:
        assert ("*" in t.user_attrs.get("label", "")) == ("storage_notes" in t.user_attrs), t.user_attrs.get("label")
    assert ("storage_notes" in recipe["metrics"]) == ("storage_notes" in trial.user_attrs)

    code, out, err = run(["export", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db",
                          "--trial", recommended, "-o", tmp_path / "exported.yaml"], capsys)
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "exported.yaml").read_text()) == recipe

    code, out, err = run(["apply", tmp_path / "recipe.yaml", "--out", tmp_path / "deploy"], capsys)
    assert code == 0, err
    assert (tmp_path / "deploy" / "recipe.yaml").read_text() == (tmp_path / "recipe.yaml").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "deploy").iterdir()} == {0o666 & ~umask}
    from transformers import AutoModelForCausalLM

    from transformers import AutoTokenizer

    from evaluators.perplexity import PerplexityProtocol, measure_perplexity
    from planner.sources import DataSource, load_corpus

    # The deployed folder, loaded by plain transformers, scores what the recipe recorded.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "deploy")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "deploy")
    protocol = PerplexityProtocol.from_dict(recipe["metrics"]["perplexity"]["protocol"])
    corpus = load_corpus(DataSource.parse(str(text_corpus_dir)))
    deployed = measure_perplexity(reloaded, tokenizer, corpus.eval, protocol).perplexity
    assert deployed == pytest.approx(recipe["metrics"]["perplexity"]["perplexity"], rel=0.01)

    code, out, err = run(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--json"], capsys)
    assert code == 0, err
    reviewed = json.loads(out)
    assert reviewed["recommended"] == recommended
    assert [row["trial"] for row in reviewed["front"]][0] == recommended
    measured = [t for t in stored.trials if "perplexity" in t.user_attrs.get("metrics", {})]
    best = reviewed["best_per_objective"]
    assert best["perplexity"]["perplexity"] == min(t.user_attrs["metrics"]["perplexity"] for t in measured)
    assert best["weight_mb"]["weight_mb"] == min(t.user_attrs["metrics"]["weight_mb"] for t in measured)

    code, out, err = run(["review", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--json"], capsys)
    # The storage listing counts the trials stored, repeats drawn on top of the count included.
    assert code == 0 and [(r["study"], r["trials"]) for r in json.loads(out)] == [("tiny", len(stored.trials))]
    (tmp_path / "studies").mkdir()
    shutil.copy(tmp_path / "tiny.db", tmp_path / "studies" / "copy.db")
    monkeypatch.chdir(tmp_path)  # no --storage: every studies/*.db is listed
    code, out, err = run(["review"], capsys)
    assert code == 0 and out.split() == ["tiny", str(len(stored.trials)), "trials", "sqlite:///studies/copy.db"]

    report = tmp_path / "report.html"
    code, out, err = run(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db",
                          "--html", report], capsys)
    assert code == 0, err
    assert "Best trial per objective" in out and f"report written to {report}" in out
    page = report.read_text()
    assert "What perplexity costs in weight MB" in page and "parameter importances" in page
    assert page.count("Plotly.newPlot") >= 2 and "src=\"https://" not in page  # plotly.js inlined


def test_rejected_by_spec_is_cheap_and_search_resumes(study, tmp_path, capsys):
    from planner.candidates import hand_picked
    from planner.settings import make_settings, read_study_file
    from planner.study import prepare

    code, _, err = run(["search", "--study-file", study, "--trials", "3", "--memory-budget", "0.6x", "-q"], capsys)
    assert code in (0, 1), err
    stored = load(tmp_path)
    assert not [t for t in stored.trials if "rejected" in t.user_attrs]  # no seed over the budget
    # The baseline is over 0.6x: queued by hand, it is rejected from its spec alone.
    stored.enqueue_trial(hand_picked(prepare(make_settings(read_study_file(study), {})).spaces)[0])
    code, _, err = run(["search", "--study-file", study, "--trials", "5", "--memory-budget", "0.6x", "-q"], capsys)
    stored = load(tmp_path)
    counted = [t for t in stored.trials if not {"duplicate_of", "rejected"} & set(t.user_attrs)]
    assert len(counted) == 5 and len(stored.trials) > 5  # continued, not restarted; the rejection drawn on top
    rejected = [t for t in stored.trials if "rejected" in t.user_attrs]
    assert rejected and rejected[0].user_attrs["label"] == "baseline"
    assert all(t.user_attrs["seconds"]["total"] < 1.0 for t in rejected)
    assert all(t.constraints["memory"] > 0 for t in rejected)


def test_a_memory_budget_no_candidate_fits_is_refused_before_the_study_starts(study, tmp_path, capsys):
    code, out, err = run(["search", "--study-file", study, "--trials", "2", "--memory-budget", "1KB"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "no candidate of the search space fits the memory budget of 0.0 MB: the smallest, " in err
    assert not (tmp_path / "tiny.db").exists() and not (tmp_path / "recipe.yaml").exists()


def test_smallest_candidate_is_the_smallest_the_study_can_draw(study, tmp_path, capsys):
    """Sizes of many sampled candidates are never below the corner the up-front check computes."""
    from planner.candidates import estimate_weight_bytes, smallest_candidate, suggest_stages
    from planner.settings import make_settings, read_study_file
    from planner.study import prepare

    settings = make_settings(read_study_file(study), {"trials": 1})
    bench = prepare(settings)
    floor, stages = smallest_candidate(bench.model, bench.spaces)
    assert floor == estimate_weight_bytes(bench.model, stages) and stages
    # what a target stores beyond the held tensors (e.g. llama.cpp's F32 norms) is part of every size
    assert smallest_candidate(bench.model, bench.spaces, beyond=lambda shaped: 1000)[0] == floor + 1000
    # the study's up-front refusal counts the target's own rule: 1000 bytes beyond, a budget 1 byte short refused
    from planner import study as study_module
    from planner.budgets import Budget
    from planner.errors import PlannerError

    bench.target.stored_beyond = lambda shaped: 1000
    bench.budgets = [Budget("memory", floor + 1000)]
    study_module._require_a_fitting_candidate(bench)
    bench.budgets = [Budget("memory", floor + 999)]
    with pytest.raises(PlannerError, match=f"the smallest, .* stores {(floor + 1000) / 1e6:.1f} MB"):
        study_module._require_a_fitting_candidate(bench)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = sampler.ask()
        assert estimate_weight_bytes(bench.model, suggest_stages(trial, bench.spaces)) >= floor
        sampler.tell(trial, 0.0)


def test_a_budget_nothing_measured_meets_says_so_and_fails(study, tmp_path, capsys):
    code, out, err = run(["search", "--study-file", study, "--trials", "2", "--latency-budget", "0.001ms", "-q"],
                         capsys)
    assert code == 1
    assert "No measured candidate meets the budget. Closest" in out and "no recipe written" in out
    assert not (tmp_path / "recipe.yaml").exists()


@pytest.mark.parametrize("extra, message", [
    (["--memory-budget", "lots"], "not a number with a unit"),
    (["--latency-budget=-3ms"], "must be positive"),
    (["--memory-budget", "300 furlongs"], "unknown unit"),
    (["--sampler", "cmaes"], "unknown sampler 'cmaes'"),
    (["--storage", "mongodb://x/y"], "is not a storage URL"),
    (["--study", "bad name!"], "may hold only"),
])
def test_bad_search_input_is_one_line_and_leaves_the_study_alone(study, tmp_path, capsys, extra, message):
    db = tmp_path / "tiny.db"
    code, out, err = run(["search", "--study-file", study, *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not db.exists()


def test_bad_study_files(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("trials = [")
    assert "is not valid TOML" in run(["search", "--study-file", bad], capsys)[2]
    bad.write_text("trails = 3")
    assert "unknown study setting 'trails'" in run(["search", "--study-file", bad], capsys)[2]
    bad.write_text('trials = "many"')
    assert "must be int" in run(["search", "--study-file", bad], capsys)[2]
    assert "does not exist" in run(["search", "--study-file", tmp_path / "nope.toml"], capsys)[2]


def test_unknown_space_settings_are_named(study, tmp_path, capsys):
    study.write_text(study.read_text() + "\n[space.sparsify]\nratio = 1\n")
    code, _, err = run(["search", "--study-file", study, "--trials", "1"], capsys)
    assert code == 2 and "space.sparsify: unknown technique" in err


def test_review_and_export_of_missing_studies(tmp_path, capsys):
    code, _, err = run(["review", "--study", "ghost", "--storage", f"sqlite:///{tmp_path}/none.db"], capsys)
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "none.db").exists()


def test_starting_points_cross_presets_with_reduced_shapes_and_skip_what_cannot_fit(study):
    from planner.candidates import CornerTrial, estimate_weight_bytes, hand_picked, on_shapes, starting_points
    from planner.candidates import suggest_stages
    from planner.settings import make_settings, read_study_file
    from planner.study import prepare

    settings = make_settings(read_study_file(study), {"trials": 40})
    bench = prepare(settings)
    crossed = on_shapes(bench.spaces)
    # The tiny model's fitted space: depth kept (2 layers), MLP keep {1, .875, .75, .5} x heads keep {1, .67}:
    # 7 reduced shapes are too many, so the corners (each ratio alone at its least, then both), each with
    # 4-bit RTN (GPTQ is not in this space) and dynamic int8.
    students = [p for p in crossed if p.get("distillation.enabled")]  # student shapes are seeds too
    assert students and not any(p.get("pruning.enabled") for p in students)
    shapes = {(p["pruning.mlp_keep"], p["pruning.heads_keep"]) for p in crossed if p.get("pruning.enabled")}
    assert shapes == {(0.5, 1.0), (1.0, 0.67), (0.5, 0.67)}, shapes
    assert {p["quantization.method"] for p in crossed} == {"rtn", "dynamic-int8"}
    assert all(p["quantization.rtn.attn_bits"] == 4 for p in crossed if p["quantization.method"] == "rtn")

    size = lambda p: estimate_weight_bytes(bench.model, suggest_stages(CornerTrial(p), bench.spaces))  # noqa: E731
    everything = hand_picked(bench.spaces) + crossed
    assert starting_points(bench.model, bench.spaces, None, 40) == everything
    limit = sorted(size(p) for p in everything)[len(everything) // 2]
    kept = starting_points(bench.model, bench.spaces, limit, 40)
    assert kept == [p for p in everything if size(p) <= limit] and len(kept) < len(everything)
    # a target storing more than the held tensors (llama.cpp's F32 norms) leaves out what that puts over the limit
    assert starting_points(bench.model, bench.spaces, limit, 40, beyond=lambda shaped: 1) == \
        [p for p in everything if size(p) + 1 <= limit]
    hand = hand_picked(bench.spaces)
    assert len(hand) < 6 and len(starting_points(bench.model, bench.spaces, None, 8)) == 6  # 3/4 of the trials
    assert starting_points(bench.model, bench.spaces, None, 8)[:len(hand)] == hand  # presets first


def test_a_new_study_queues_its_seeds_by_its_targets_sizes(study, monkeypatch):
    """open_study hands the target's own rule (what it stores beyond the held tensors) to the seeds' sizing."""
    from planner import study as study_module
    from planner.settings import make_settings, read_study_file

    handed = []

    def recorded(model, spaces, limit, trials, beyond=None):
        handed.append((limit, beyond))
        return []

    monkeypatch.setattr(study_module, "starting_points", recorded)
    settings = make_settings(read_study_file(study), {"trials": 4, "memory_budget": "50MB"})
    created, bench = study_module.open_study(settings)
    assert handed == [(50e6, bench.target.stored_beyond)]


def test_a_kl_study_runs_end_to_end_and_reopening_it_with_other_objectives_is_refused(study, tmp_path, capsys):
    import hashlib

    code, out, err = run(["search", "--study-file", study, "--trials", "4", "-q",
                          "--objectives", "perplexity,kl,weight_mb"], capsys)
    assert code == 0, err
    assert "objectives (minimised): perplexity, KL nats, weight MB" in out and "KL nats" in out
    stored = load(tmp_path)
    assert stored.metric_names == ["perplexity", "kl", "weight_mb"]
    baseline = stored.user_attrs["baseline"]
    assert baseline["kl"] == pytest.approx(0.0, abs=1e-6) and baseline["top1_agreement"] == 1.0
    assert "decode_ms_p50" not in baseline  # latency is no objective and no budget: not measured
    measured = [t for t in stored.trials if "perplexity" in t.user_attrs.get("metrics", {})]
    for t in measured:
        row = t.user_attrs["metrics"]
        assert t.values == [row["perplexity"], row["kl"], row["weight_mb"]]
        assert 0.0 <= row["top1_agreement"] <= 1.0 and row["kl"] >= 0.0
        assert t.user_attrs["measurements"]["kl"]["protocol"] == t.user_attrs["measurements"]["perplexity"]["protocol"]
    quantized = [t for t in measured if t.user_attrs["label"] != "baseline"]
    assert quantized and all(t.user_attrs["metrics"]["kl"] > 0 for t in quantized)

    code, out, err = run(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--json"], capsys)
    reviewed = json.loads(out)
    assert reviewed["objectives"] == ["perplexity", "kl", "weight_mb"]
    assert all(row["kl"] is not None and row["top1_agreement"] is not None for row in reviewed["front"])
    assert set(reviewed["best_per_objective"]) == {"perplexity", "kl", "weight_mb"}
    code, out, err = run(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--html",
                          tmp_path / "kl.html"], capsys)
    page = (tmp_path / "kl.html").read_text()
    assert code == 0 and "What KL nats costs in weight MB" in page and "What perplexity costs in weight MB" in page
    assert "top-1 agree" in page  # the comparison table shows the agreement beside the KL
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert "kl" in recipe["metrics"]["summary"] and recipe["metrics"]["kl"]["top1_agreement"] <= 1.0
    assert recipe["provenance"]["objectives"] == ["perplexity", "kl", "weight_mb"]
    code, out, err = run(["apply", tmp_path / "recipe.yaml", "--out", tmp_path / "deploy"], capsys)
    assert code == 0, err

    before = hashlib.sha256((tmp_path / "tiny.db").read_bytes()).hexdigest()
    code, out, err = run(["search", "--study-file", study, "--trials", "5", "-q",
                          "--objectives", "perplexity,kl,decode_ms,weight_mb"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("planner: error: study 'tiny' optimises perplexity, kl, weight_mb, not perplexity, kl, "
                          "decode_ms_p50, weight_mb")
    assert hashlib.sha256((tmp_path / "tiny.db").read_bytes()).hexdigest() == before


def test_an_existing_three_objective_study_reopened_with_four_is_refused_untouched(study, tmp_path, capsys):
    import hashlib

    code, _, err = run(["search", "--study-file", study, "--trials", "2", "-q"], capsys)
    assert code in (0, 1), err
    before = hashlib.sha256((tmp_path / "tiny.db").read_bytes()).hexdigest()
    for command in (["search"], ["create"]):
        code, out, err = run(command + ["--study-file", study, "--trials", "3",
                                        "--objectives", "perplexity,kl,decode_ms_p50,weight_mb"], capsys)
        assert code == 2 and err.count("\n") == 1 and "optimises perplexity, decode_ms_p50, weight_mb" in err
    assert hashlib.sha256((tmp_path / "tiny.db").read_bytes()).hexdigest() == before
