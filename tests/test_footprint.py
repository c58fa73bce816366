"""The memory a study needs: the precision the model is held in, training left out where it cannot fit, a model that
cannot fit refused up front in one line; and a study on a model held in bfloat16 runs end to end on llama.cpp, its
reference GGUF in BF16."""
from __future__ import annotations

import optuna
import pytest
import torch

import cli
from planner import footprint
from planner.errors import PlannerError
from planner.footprint import Footprint, checkpoint_dtype, choose_precision, parameter_count, without_training
from planner.storage import open_storage
from tests.conftest import make_tiny_llama, make_tiny_tokenizer

P = 1_240_000_000  # a Llama-3.2-1B's parameters


def test_the_needs_are_the_model_copies_plus_the_overhead():
    f32, bf16 = Footprint(P, "float32"), Footprint(P, "bfloat16")
    assert f32.model_bytes == 4 * P and bf16.model_bytes == 2 * P
    assert f32.study_bytes == int(4 * P + footprint.WORK_BYTES * P + footprint.STUDY_OVERHEAD)
    assert bf16.study_bytes == int(2 * P + footprint.WORK_BYTES * P + footprint.STUDY_OVERHEAD)
    assert bf16.training_bytes == int(footprint.TRAINING_COPIES * 2 * P + footprint.TRAINING_OVERHEAD)
    assert f32.study_bytes < f32.training_bytes
    small = Footprint(10 ** 6, "float32")  # a model too small for training to be its peak: the tables are
    assert small.training_bytes == small.study_bytes


@pytest.mark.parametrize("available,stored,dtype,training,says", [
    (64e9, "bfloat16", "float32", True, None),  # everything fits in float32: as before
    (20e9, "bfloat16", "bfloat16", True, "held in bfloat16 as its checkpoint is"),  # training fits only in 16 bits
    (20e9, "float16", "float16", True, "the reference GGUF is float16"),
    (20e9, "float32", "bfloat16", True, "held in bfloat16"),  # a float32 checkpoint: bfloat16's range, halved
    (14.5e9, "bfloat16", "float32", False, "distillation and healing left out"),  # float32 without training fits
    (12e9, "bfloat16", "bfloat16", False, "distillation and healing left out"),
])
def test_auto_keeps_float32_where_everything_fits_else_the_checkpoints_precision_else_drops_training(
        available, stored, dtype, training, says):
    chosen = choose_precision(P, "auto", stored, int(available), "model")
    assert (chosen.dtype, chosen.training) == (dtype, training)
    assert (chosen.note is None) if says is None else (says in chosen.note)


def test_a_model_that_cannot_fit_is_refused_saying_what_it_needs():
    with pytest.raises(PlannerError) as refused:
        choose_precision(8_000_000_000, "auto", "bfloat16", int(12e9), "meta-llama/Llama-3.1-8B")
    line = str(refused.value)
    assert "\n" not in line and line.startswith("meta-llama/Llama-3.1-8B needs about 46.7 GB of memory")
    assert "bfloat16" in line and "12.0 GB available" in line
    # a precision asked for is kept: training left out where only the rest fits, refused where nothing does
    assert choose_precision(P, "float32", "bfloat16", int(16e9), "m") == footprint.Precision(
        "float32", False, "distillation and healing left out: training needs about 28.3 GB in float32, 16.0 GB "
                          "available")
    with pytest.raises(PlannerError, match="needs about 14.0 GB"):
        choose_precision(P, "float32", "bfloat16", int(9e9), "m")


def test_the_checkpoints_precision_and_the_parameter_count_come_from_the_config_alone():
    model = make_tiny_llama(vocab_size=300)
    config = model.config
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())  # the tied head counted once
    config.dtype = torch.bfloat16
    assert checkpoint_dtype(config) == "bfloat16"
    config.dtype = "float16"
    assert checkpoint_dtype(config) == "float16"
    config.dtype = None
    assert checkpoint_dtype(config) == "float32"


def test_without_training_leaves_students_and_healing_out_and_the_rest_as_it_was():
    from search_spaces.distillation import DistillSpace
    from search_spaces.pruning import PruneSpace

    spaces = {"distillation": DistillSpace(), "pruning": PruneSpace(), "quantization": object()}
    out = without_training(spaces)
    assert out["distillation"].enabled == (False,) and out["pruning"].heal == (False,)
    assert out["pruning"].mlp_keep == PruneSpace().mlp_keep and out["quantization"] is spaces["quantization"]
    assert spaces["distillation"].enabled == DistillSpace().enabled  # the given spaces untouched


@pytest.fixture
def bf16_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bf16")
    tokenizer = make_tiny_tokenizer()
    make_tiny_llama(vocab_size=len(tokenizer)).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_study_of_a_model_that_fits_only_in_its_bfloat16_runs_on_a_bf16_reference(
        tiny_study_file, tiny_model_dir, bf16_model_dir, tmp_path, capsys, monkeypatch):
    """Memory for the tiny model's training in bfloat16 but not in float32: the model is held in bfloat16, the
    reference GGUF is BF16, every trial kind runs (llama-quant, rtn, students and healed cuts), the recipe applies;
    a worker that would hold it in float32 is refused."""
    from gguf import GGUFReader

    import targets.llamacpp.target as llamacpp_target

    parameters = sum(p.numel() for p in make_tiny_llama(vocab_size=len(make_tiny_tokenizer())).parameters())
    fits = Footprint(parameters, "bfloat16").training_bytes  # bfloat16 with training fits; float32 does not
    monkeypatch.setattr(footprint, "available_memory", lambda: fits)
    trims = []
    monkeypatch.setattr("planner.trial.release_freed_memory", lambda: trims.append(1))
    written = []
    real_write = llamacpp_target.writer.write

    def recording(model, tokenizer, path, name="planner candidate", **options):
        info = real_write(model, tokenizer, path, name, **options)
        if name.startswith("reference"):
            written.append({t.name: t.tensor_type.name for t in GGUFReader(path).tensors})
        return info

    monkeypatch.setattr(llamacpp_target.writer, "write", recording)
    text = tiny_study_file.read_text().replace(f'model = "{tiny_model_dir}"', f'model = "{bf16_model_dir}"')
    tiny_study_file.write_text(text.replace('methods = ["none", "rtn", "dynamic-int8"]',
                                            'methods = ["rtn", "llama-quant"]\n[space.quantization.allocation]\n'
                                            'bpw = [5.0]\nsamples = 4\nseq_len = 32\n'))
    code = cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "8", "--target", "llama.cpp",
                     "--objectives", "perplexity,weight_mb", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "held in bfloat16 as its checkpoint is" in out + err
    study = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))
    assert study.user_attrs["dtype"] == "bfloat16"
    assert written and {kind for kind in written[0].values()} - {"F32"} == {"BF16"}  # norms stay F32, as converted
    techniques = {s["technique"] for t in study.trials if "measurements" in t.user_attrs for s in t.user_attrs["stages"]}
    assert {"quantization", "distillation", "pruning"} <= techniques
    assert {"llama-quant", "rtn"} <= {s["spec"].get("method") for t in study.trials if "measurements" in t.user_attrs
                                      for s in t.user_attrs["stages"] if s["technique"] == "quantization"}
    failed = [t.user_attrs["failure"] for t in study.trials if "failure" in t.user_attrs]
    assert not failed, failed
    assert len(trims) >= len(study.trials)  # the heap trimmed after every trial
    import yaml

    import planner.apply

    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["provenance"]["dtype"] == "bfloat16"
    loaded_as = []
    real_load = planner.apply.load_model
    monkeypatch.setattr(planner.apply, "load_model", lambda *a, **k: loaded_as.append(a[2]) or real_load(*a, **k))
    code = cli.main(["apply", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "deploy")])
    assert code == 0, capsys.readouterr().err
    assert loaded_as == [torch.bfloat16]  # rebuilt from the model as the study held it
    assert (tmp_path / "deploy" / "model.gguf").is_file()

    monkeypatch.setattr(footprint, "available_memory", lambda: 10 ** 12)  # a worker with room for float32
    code = cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "9", "--target", "llama.cpp",
                     "--objectives", "perplexity,weight_mb", "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "holds the model in bfloat16, this process in float32 (pass --dtype bfloat16" in err


def _anonymous() -> int:
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return int(status["RssAnon"].split()[0]) * 1024


def test_the_heap_trimmed_after_a_trial_hands_back_the_pages_of_freed_tensors():
    """glibc keeps the pages of freed tensors for reuse (interleaved with live ones, they stay resident): a trial's
    leftovers would be under the next trial's peak. `release_memory` (after every trial) hands them back."""
    from planner.trial import release_memory

    pytest.importorskip("ctypes").CDLL("libc.so.6").malloc_trim  # glibc only
    before = _anonymous()
    del [torch.randn(1000, 1000) for _ in range(8)][:]  # big temporaries freed: glibc's mmap threshold rises above
    spread = [torch.randn(300, 1000) for _ in range(600)]  # the next ones, which now come from the heap  # 1.2 MB each, 720 MB
    kept = spread[::50]  # one in 50 stays alive, pinning the heap's top
    del spread
    left = _anonymous() - before
    release_memory()
    assert left > 500e6 and _anonymous() - before < 0.25 * left
    del kept


def test_a_model_too_big_for_the_machine_is_refused_before_its_weights_are_read(tmp_path, capsys, monkeypatch):
    """Only the config is read (a folder without weights is enough to refuse): one line, a non-zero exit, no study."""
    from transformers import LlamaConfig

    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(footprint, "available_memory", lambda: int(20e9))
    folder = tmp_path / "llama-8b"
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                dtype="bfloat16").save_pretrained(folder)
    code = cli.main(["search", "--model", str(folder), "--study", "big", "--storage",
                     f"sqlite:///{tmp_path}/big.db", "--trials", "1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err  # nothing fetched before it
    assert f"{folder} needs about 46.9 GB of memory for a study (8.03 B parameters held in bfloat16" in err
    assert "20.0 GB available" in err and not (tmp_path / "big.db").exists()
