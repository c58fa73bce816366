"""The study's seeds lie in its own spaces: every enqueued candidate gives each parameter one of the choices the
techniques' `suggest` offers it (Optuna fails a trial enqueued with any other value), for the default spaces,
every target's fitted defaults and randomly narrowed spaces; one that does not is left out with one line, and a
default search on a tiny model with a memory budget has no failed trial."""
from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_EVALUATION, TINY_STUDY_SPACE, make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer
from planner.candidates import OutsideSpace, SeedTrial, hand_picked, on_shapes, starting_points, suggest_stages
from planner.study import resolve_spaces
from search_spaces import TECHNIQUES, ordered
from search_spaces.distillation import DistillSpace
from search_spaces.pruning import PruneSpace
from search_spaces.structure.shape import MAX_SHAPES, reduced_shapes
from targets import TARGETS

KEEP_RATIOS = (1.0, 0.9, 0.875, 0.8, 0.75, 0.7, 0.67, 0.5, 0.25)
MODELS = {  # 2 layers: few distinct shapes; 9 layers: every default depth is its own shape (the corners)
    "llama-2": lambda: make_tiny_llama(),
    "llama-9": lambda: make_tiny_llama(num_hidden_layers=9),
    "gpt2": lambda: make_tiny_gpt2(),  # no head pruning
}
_built: dict = {}
# Each target with each model it serves (llama.cpp serves no GPT-2).
PAIRS = [(target, name) for target in sorted(TARGETS) for name in sorted(MODELS)
         if (target, name) != ("llama.cpp", "gpt2")]


def model(name: str):
    if name not in _built:
        _built[name] = MODELS[name]()
    return _built[name]


def seeds(spaces: dict) -> list[dict]:
    """Every candidate the seeding proposes: the hand-picked ones, each shape with the shape presets, and each
    shape on its own (what the shapes are when no storage stage has a shape preset)."""
    off = hand_picked(spaces)[0]
    alone = [{**off, **t.qualified(p)} for t in ordered() if spaces.get(t.name) is not None
             for p in t.shapes(spaces[t.name])]
    return hand_picked(spaces) + on_shapes(spaces) + alone


def refusal(study: optuna.Study, params: dict, spaces: dict) -> str | None:
    """What Optuna says when a trial enqueued with `params` runs the techniques' suggestions (None: nothing,
    and every parameter it asked for took the given value)."""
    study.enqueue_trial(params)
    trial = study.ask()
    try:
        suggest_stages(trial, spaces)
    except ValueError as exc:
        return str(exc)
    finally:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert all(trial.params[name] == params[name] for name in set(trial.params) & set(params)), (params, trial.params)
    return None


def assert_seeds_in(spaces: dict) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    proposed = seeds(spaces)
    for params in proposed:
        assert refusal(study, params, spaces) is None, params
    # ... and the planner's own check agrees: it leaves none of them out
    lines = []
    assert starting_points(None, spaces, None, 10 * len(proposed) + 10, say=lines.append) == \
        hand_picked(spaces) + on_shapes(spaces)
    assert lines == []
    return proposed


def default_spaces() -> dict:
    return {name: t.space_type() for name, t in TECHNIQUES.items()}


def fitted_defaults(target, model_) -> dict:
    return target.fit_spaces(resolve_spaces(SimpleNamespace(space={}), model_, target.space_defaults()), model_)


def test_the_default_student_corners_take_the_space_s_own_largest_ratios_not_1():
    space = DistillSpace()
    assert 1.0 not in space.depth_keep
    assert reduced_shapes(space) == [{"enabled": True, "depth_keep": 0.7, "mlp_keep": 1.0},
                                     {"enabled": True, "depth_keep": 0.9, "mlp_keep": 0.75},
                                     {"enabled": True, "depth_keep": 0.7, "mlp_keep": 0.75}]
    # pruning keeps 1.0 among its ratios: its corners cut one ratio alone, as before
    narrowed = replace(PruneSpace(), depth_keep=(0.9, 0.8), mlp_keep=(0.875, 0.75, 0.5), heads_keep=(1.0,))
    assert reduced_shapes(narrowed) == [{"enabled": True, "depth_keep": 0.8, "mlp_keep": 0.875},
                                        {"enabled": True, "depth_keep": 0.9, "mlp_keep": 0.5},
                                        {"enabled": True, "depth_keep": 0.8, "mlp_keep": 0.5}]


def test_the_seeds_of_the_default_spaces_lie_in_them():
    proposed = assert_seeds_in(default_spaces())
    assert any(p.get("distillation.enabled") for p in proposed) and any(p.get("pruning.enabled") for p in proposed)


@pytest.mark.parametrize("target,model_name", PAIRS)
def test_the_seeds_of_each_target_s_fitted_defaults_lie_in_them(target, model_name):
    spaces = fitted_defaults(TARGETS[target], model(model_name))
    assert_seeds_in(spaces)
    if model_name == "llama-9":  # three distinct depths: more student shapes than MAX_SHAPES, so corners
        assert len(spaces["distillation"].depth_keep) == 3 and len(reduced_shapes(spaces["distillation"])) < MAX_SHAPES


def subset(values, min_size=1):
    """A narrowing of `values`: some of them, in their order."""
    return st.lists(st.sampled_from(values), min_size=min_size, unique=True).map(
        lambda chosen: tuple(v for v in values if v in chosen))


def ratios():
    return st.lists(st.sampled_from(KEEP_RATIOS), min_size=1, max_size=5, unique=True).map(tuple)


@st.composite
def narrowed_spaces(draw):
    """A target's defaults narrowed as a study file may (any keep ratios, with or without 1.0), fitted to a model."""
    target_name, model_name = draw(st.sampled_from(PAIRS))
    target, model_ = TARGETS[target_name], model(model_name)
    spaces = fitted_defaults(target, model_)
    quant = spaces["quantization"]
    given = {
        "distillation": replace(spaces["distillation"], enabled=draw(subset((False, True))), depth_keep=draw(ratios()),
                                mlp_keep=draw(ratios()), heads_keep=draw(ratios())),
        "pruning": replace(spaces["pruning"], enabled=draw(subset((False, True))), depth_keep=draw(ratios()),
                           mlp_keep=draw(ratios()), heads_keep=draw(ratios()), heal=draw(subset((False, True))),
                           sparsity={"attn": draw(subset((0.0, 0.25, 0.5))), "mlp": draw(subset((0.0, 0.5)))}),
        "quantization": replace(quant, methods=draw(subset(quant.methods)), bits=draw(subset(quant.bits)),
                                head_bits=draw(subset(quant.head_bits, min_size=0)),
                                group_sizes=draw(subset(quant.group_sizes))),
    }
    for name in draw(st.lists(st.sampled_from(sorted(given)), unique=True, max_size=2)):
        given[name] = None  # a technique switched off in the study file
    fitted = {name: None if space is None else TECHNIQUES[name].fit(space, model_)[0] for name, space in given.items()}
    return target.fit_spaces(fitted, model_)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(narrowed_spaces())
def test_the_seeds_of_randomly_narrowed_spaces_lie_in_them(spaces):
    assert_seeds_in(spaces)


def outcome(run) -> str:
    """'in' when `run()` suggests the stages, 'outside' when a parameter's value is refused (by the planner's
    check, or by Optuna's own: "'1.0' not in (0.9, 0.8, 0.7)."), else the error the suggestion raised."""
    try:
        run()
    except OutsideSpace:
        return "outside"
    except Exception as exc:  # noqa: BLE001 - compared, not hidden
        return "outside" if re.fullmatch(r"'.*' not in \(.*\)\.", str(exc)) else type(exc).__name__
    return "in"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_planner_refuses_a_seed_exactly_when_optuna_would(data):
    spaces = default_spaces()
    params = dict(data.draw(st.sampled_from(seeds(spaces))))
    name = data.draw(st.sampled_from(sorted(params)))
    params[name] = data.draw(st.sampled_from([1.0, 0.9, 0.7, 0.5, 0, 4, 8, True, False, None, "rtn", "gptq", "x"]))

    def optuna_trial():
        study = optuna.create_study()
        study.enqueue_trial(params)
        suggest_stages(study.ask(), spaces)

    assert outcome(lambda: suggest_stages(SeedTrial(params), spaces)) == outcome(optuna_trial), params


def test_a_seed_outside_its_space_is_left_out_with_one_line(monkeypatch):
    import search_spaces.distillation as distillation

    # the corner the default student space used to be seeded with: depth 1.0 is no choice of (0.9, 0.8, 0.7)
    bad, good = {"enabled": True, "depth_keep": 1.0, "mlp_keep": 0.75}, {"enabled": True, "depth_keep": 0.7}
    monkeypatch.setattr(distillation, "reduced_shapes", lambda space: [bad, good])
    spaces = default_spaces()
    proposed = hand_picked(spaces) + on_shapes(spaces)
    outside = [p for p in proposed if p.get("distillation.depth_keep") == 1.0]
    lines = []
    assert starting_points(None, spaces, None, 100, say=lines.append) == [p for p in proposed if p not in outside]
    assert len(outside) > 1 and lines == ["planner: a seed left out: distillation.depth_keep = 1.0 is not among "
                                          "its choices (0.9, 0.8, 0.7)"]  # once, however many seeds it costs


# Cheap candidates, default seeds: the tiny studies' spaces with no quantization method left out, measured with
# the shortest latency protocol (one thread: two cores are shared).
CHEAP_STUDY = TINY_STUDY_SPACE.replace(TINY_EVALUATION, """
target = "transformers"

[evaluation.perplexity]
context_length = 64
stride = 64
max_tokens = 128

[evaluation.latency]
prompt_tokens = 8
new_tokens = 2
repeats = 1
warmup = 0
threads = 1
""").replace('methods = ["none", "rtn", "dynamic-int8"]\n', "") + """
[space.quantization.gptq]
samples = 2
seq_len = 32
"""


def test_a_default_search_with_a_memory_budget_has_no_failed_trial(tmp_path, text_corpus_dir, monkeypatch, capsys):
    import cli
    from planner.storage import open_storage

    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "llama-9"
    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=9).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    study_file = tmp_path / "study.toml"
    study_file.write_text(f'model = "{folder}"\ndata = "{text_corpus_dir}"\nstudy = "seeds"\n'
                          f'storage = "sqlite:///{tmp_path}/seeds.db"\nrecipe = "{tmp_path}/recipe.yaml"\n'
                          + CHEAP_STUDY)
    code = cli.main(["search", "--study-file", str(study_file), "--memory-budget", "0.8x", "--trials", "20",
                     "--objectives", "kl,decode_ms_p50,weight_mb", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "seed left out" not in out + err
    study = optuna.load_study(study_name="seeds", storage=open_storage(f"sqlite:///{tmp_path}/seeds.db"))
    failed = [(t.number, t.user_attrs.get("failure")) for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed == []
    # the student corner that used to be seeded with depth 1.0 is seeded at the space's largest depth instead
    enqueued = [t.system_attrs["fixed_params"] for t in study.trials if "fixed_params" in t.system_attrs]
    assert any(p.get("distillation.depth_keep") == 0.9 and p.get("distillation.mlp_keep") == 0.75 for p in enqueued)


def test_a_shape_whose_presets_are_over_the_memory_budget_is_seeded_with_its_smallest_candidate():
    """The demo's case: 4-bit with a quantized head of its own is over a tight budget on every reduced shape,
    4-bit with the tied head left shared fits: the shapes are seeded with that instead of not at all."""
    from planner import candidates

    model = make_tiny_llama(vocab_size=len(make_tiny_tokenizer()))
    spaces = default_spaces()
    sizes = {}
    for params in on_shapes(spaces) + on_shapes(spaces, smallest=True):
        sizes[repr(params)] = candidates.estimate_weight_bytes(model, suggest_stages(SeedTrial(params), spaces))
    presets = [p for p in on_shapes(spaces)]
    smallest = [p for p in on_shapes(spaces, smallest=True)]
    limit = min(sizes[repr(p)] for p in presets) - 1  # no shape preset fits, some smallest candidate does
    assert any(sizes[repr(p)] <= limit for p in smallest)
    seeds = starting_points(model, spaces, limit, 100, say=lambda line: None)
    shaped = [p for p in seeds if p in smallest]
    assert shaped and all(sizes[repr(p)] <= limit for p in shaped)
    assert not [p for p in seeds if p in presets]
    assert starting_points(model, spaces, None, 100, say=lambda line: None)[-1] in presets  # no budget: presets
