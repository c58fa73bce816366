"""A large derived candidate's tables carry the source model's KL gains and compensated ratios (carried.py)."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

import targets  # noqa: F401  (registers llama-quant)
from search_spaces import TECHNIQUES
from search_spaces.base import BuildContext
from search_spaces.quantization import QuantSpec
from search_spaces.quantization.spec import AllocationSettings
from search_spaces.structure.surgery import copy_modules, drop_layers
from targets.base import CARRIABLE_SECONDS, TABLES_SECONDS
from targets.llamacpp import allocated, carried, sensitivity, writer
from targets.llamacpp.allocated import PLAN_ATTRIBUTE, _cache_file, _calibration_key, sensitivity_tables
from targets.llamacpp.carried import source_name
from tests.conftest import SAMPLE_TEXT, Doc, make_tiny_llama, make_tiny_tokenizer

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4)
UPSTREAM = ({"technique": "pruning", "spec": {"depth_keep": 0.75}},)  # what makes a candidate derived


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def test_a_tensor_maps_to_the_source_tensor_of_its_role_at_its_relative_depth():
    names = [source_name(f"blk.{i}.ffn_down.weight", 13, 16) for i in range(13)]
    layers = [int(n.split(".")[1]) for n in names]
    assert layers[0] == 0 and layers[-1] == 15 and layers == sorted(set(layers))  # ends kept, in order, distinct
    assert source_name("blk.1.attn_v.weight", 3, 4) == "blk.2.attn_v.weight"  # the middle of 1/3..2/3: 2 of 0..3
    assert source_name("output.weight", 3, 4) == "output.weight"
    assert [source_name(f"blk.{i}.attn_q.weight", 4, 4) for i in range(4)] == [f"blk.{i}.attn_q.weight"
                                                                              for i in range(4)]


def _derived(tokenizer):
    source = make_tiny_llama(vocab_size=len(tokenizer), **SHAPE)
    cut = copy_modules(source)
    drop_layers(cut, [0, 1, 3])
    with torch.no_grad():  # weights of its own, as a trained student's
        for p in cut.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return source, cut


def test_a_large_derived_candidate_carries_the_gains_and_ratios_and_keeps_its_own_errors(tokenizer, tmp_path,
                                                                                       monkeypatch):
    source, cut = _derived(tokenizer)
    windows = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    context = BuildContext(tokenizer=tokenizer, calibration=[Doc(SAMPLE_TEXT * 4)], seed=0, cache_dir=tmp_path,
                           model_id="tiny-carried", progress=False)
    sensitivity_tables(source, windows, context, compensate=True)
    derived = replace(context, upstream=UPSTREAM)
    # below CARRY_PARAMETERS nothing is carried, the source's tables there or not: the cut's computed in full (its
    # own folder: another upstream spec, the same source tables)
    exact_context = replace(context, upstream=({"technique": "pruning", "spec": {"depth_keep": 0.7}},))
    exact = sensitivity_tables(cut, windows, exact_context, compensate=True)
    monkeypatch.setattr(carried, "CARRY_PARAMETERS", 0)
    folder = _cache_file(derived, _calibration_key(windows))
    exact_folder = _cache_file(exact_context, _calibration_key(windows))
    assert not (exact_folder / "carried.json").exists()
    with monkeypatch.context() as patch:
        patch.setattr(sensitivity, "kl_gains", lambda *a, **k: pytest.fail("KL gains measured"))
        patch.setattr(sensitivity, "compensated_options", lambda *a, **k: pytest.fail("compensation measured"))
        tables = sensitivity_tables(cut, windows, derived, compensate=True)
    assert json.loads((folder / "carried.json").read_text())["parts"] == tables["carried"] == ["compensated", "gains"]
    with monkeypatch.context() as patch:  # tables of its own cached: the source's are not read again
        patch.setattr(carried.SourceTables, "read", lambda *a: pytest.fail("source tables read"))
        assert sensitivity_tables(cut, windows, derived, compensate=True)["carried"] == tables["carried"]
    assert exact["carried"] == []
    source_folder = _cache_file(context, _calibration_key(windows))
    src = json.loads((source_folder / "table.json").read_text())
    src_compensated = json.loads((source_folder / "compensated.json").read_text())
    own = json.loads((folder / "table.json").read_text())
    exact_own = json.loads((exact_folder / "table.json").read_text())
    assert own["errors"] == exact_own["errors"]  # the cut's own errors, whichever way its factors came
    assert own["errors"] != {n: o for n, o in src["errors"].items() if n in own["errors"]}  # not the source's
    for name in own["errors"]:
        counterpart = source_name(name, 3, 4)
        assert own["gains"][name] == src["gains"][counterpart]
        plain = {kind: error for kind, _, error in own["errors"][name]}
        src_plain = {kind: error for kind, _, error in src["errors"][counterpart]}
        got = {o.kind: o.error for o in tables["options"][name] if o.kind.endswith("+gptq")}
        if name == "token_embd.weight":
            assert not got
            continue
        kl, error = src["gains"][counterpart]
        expected = {kind: max(kl / error, 0.0) * plain[kind[:-5]] * e / src_plain[kind[:-5]]
                    for kind, _, e in src_compensated[counterpart]}
        assert got.keys() == expected.keys() and len(got) >= 8
        for kind in got:
            assert got[kind] == pytest.approx(expected[kind], rel=1e-9)
    # a cut whose source's tables are not cached computes its own
    alone = replace(derived, cache_dir=tmp_path / "empty")
    computed = []
    real = sensitivity.kl_gains
    monkeypatch.setattr(sensitivity, "kl_gains", lambda *a, **k: computed.append(1) or real(*a, **k))
    sensitivity_tables(cut, windows, alone, compensate=True)
    assert computed == [1]
    assert not (_cache_file(alone, _calibration_key(windows)) / "carried.json").exists()
    # carried tables are near the exact ones here (a cut of one layer, weights moved 1%): the same types' order
    for name in exact["options"]:
        e = {o.kind: o.error for o in exact["options"][name]}
        c = {o.kind: o.error for o in tables["options"][name]}
        assert set(e) == set(c)


def test_a_derived_candidate_with_carried_tables_is_quantized_with_compensated_blocks(tokenizer, tmp_path,
                                                                                    monkeypatch):
    """No Hessian factor is stored by carried tables: the trial's compensated rounding computes its own."""
    monkeypatch.setattr(carried, "CARRY_PARAMETERS", 0)
    source, cut = _derived(tokenizer)
    context = BuildContext(tokenizer=tokenizer, calibration=[Doc(SAMPLE_TEXT * 4)], seed=0, cache_dir=tmp_path,
                           model_id="tiny-carried-trial", progress=False)
    spec = QuantSpec(method="llama-quant", bits={"attn": 4, "mlp": 4, "head": 16}, grid="gguf", group_size=32,
                     allocation=AllocationSettings(bpw=4.5, types="all", samples=4, seq_len=32, compensate=True))
    source_built = TECHNIQUES["quantization"].apply(copy_modules(source), spec, context)
    source_plan = getattr(source_built, PLAN_ATTRIBUTE)
    assert source_plan.carriable_seconds > 0  # what the cut will not spend, on the source's trial's record
    source_written = writer.write(source_built, tokenizer, tmp_path / "source.gguf")
    assert source_written[CARRIABLE_SECONDS] == source_plan.carriable_seconds
    # the whole of its tables (a repeat on this model reads them: the deadline predicts it without them)
    assert source_written[TABLES_SECONDS] == source_plan.tables_seconds >= source_plan.carriable_seconds
    built = TECHNIQUES["quantization"].apply(cut, spec, replace(context, upstream=UPSTREAM))
    plan = getattr(built, PLAN_ATTRIBUTE)
    windows = allocated.calibration_batches(tokenizer, context.calibration, 4, 32, 0)
    folder = _cache_file(replace(context, upstream=UPSTREAM), _calibration_key(windows))
    assert (folder / "carried.json").is_file() and plan.carried == ("compensated", "gains")
    written = writer.write(built, tokenizer, tmp_path / "candidate.gguf")  # what the trial's runtime record holds
    assert written["tables_carried"] == ["compensated", "gains"] and CARRIABLE_SECONDS not in written
    assert written[TABLES_SECONDS] > 0  # its own errors (the costly parts carried)
    assert plan.compensated, plan.types  # some tensor chose compensated codes, rounded with its own factor
    for name, blocks in plan.compensated.items():
        assert blocks.dtype == np.uint8 and blocks.shape[0] == dict(
            (t.gguf_name, t.shape[0]) for t in sensitivity.quantizable(built, plan.imatrix))[name]


def test_a_large_source_models_tables_say_what_their_carried_parts_took(tokenizer, tmp_path, monkeypatch):
    """carriable_seconds: the KL gains' and the compensated ratios' seconds on a large source model (its derived
    candidates carry them: planner/deadline.py leaves them out of their predictions); 0 where they were read from
    the cache, on a small source and on a derived candidate."""
    source, cut = _derived(tokenizer)
    windows = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    context = BuildContext(tokenizer=tokenizer, calibration=[Doc(SAMPLE_TEXT * 4)], seed=0, cache_dir=tmp_path,
                           model_id="tiny-carriable", progress=False)
    real_gains, real_options = sensitivity.kl_gains, sensitivity.compensated_options

    def slow(real, seconds):
        def wrapped(*args, **kwargs):
            time.sleep(seconds)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(sensitivity, "kl_gains", slow(real_gains, 0.3))
    monkeypatch.setattr(sensitivity, "compensated_options", slow(real_options, 0.1))
    small = sensitivity_tables(source, windows, replace(context, model_id="tiny-small"), compensate=True)
    assert small["carriable_seconds"] == 0.0  # below CARRY_PARAMETERS its candidates compute their own
    monkeypatch.setattr(carried, "CARRY_PARAMETERS", 0)
    first = sensitivity_tables(source, windows, context, compensate=True)
    assert 0.3 + 0.1 <= first["carriable_seconds"] < 60  # the gains and at least one block's ratios
    assert sensitivity_tables(source, windows, context, compensate=True)["carriable_seconds"] == 0.0  # cached
    derived = sensitivity_tables(cut, windows, replace(context, upstream=UPSTREAM), compensate=True)
    assert derived["carried"] == ["compensated", "gains"] and derived["carriable_seconds"] == 0.0
