import pytest
import torch

from conftest import SAMPLE_TEXT
from evaluators.corpus import CorpusError, Document, dedupe, read_text_file, split_documents, split_text
from planner.errors import PlannerError
from planner.sources import DataSource, ModelSource, load_corpus, load_model, resolve_device, resolve_dtype


def test_folder_corpus_is_split_by_work_without_overlap(text_corpus_dir):
    corpus = load_corpus(DataSource.parse(str(text_corpus_dir)))
    train = {d.name for d in corpus.train}
    held_out = {d.name for d in corpus.eval}
    assert train.isdisjoint(held_out)
    assert train | held_out == {f"work_{i}.txt" for i in range(5)}
    assert held_out == {"work_4.txt"}  # fewer than ten works: the last one in name order
    assert "by work" in corpus.split_rule


def test_every_tenth_work_is_held_out():
    docs = [Document(f"w{i:02d}", f"text {i}") for i in range(25)]
    corpus = split_documents("x", docs, eval_fraction=0.1)
    assert [d.name for d in corpus.eval] == ["w09", "w19"]
    assert len(corpus.train) == 23


def test_single_file_is_cut_once_at_a_line_boundary(tmp_path):
    lines = [f"line {i} of the only work" for i in range(100)]
    path = tmp_path / "one.txt"
    path.write_text("\n".join(lines) + "\n")
    corpus = load_corpus(DataSource.parse(str(path)))
    (train,), (held_out,) = corpus.train, corpus.eval
    assert train.text + held_out.text == path.read_text()
    assert train.text.endswith("\n") and held_out.text.startswith("line 9")
    assert 0.05 < len(held_out.text) / len(path.read_text()) < 0.15


def test_split_text_keeps_every_character():
    head, tail = split_text(SAMPLE_TEXT * 3, 0.25)
    assert head + tail == SAMPLE_TEXT * 3 and tail


def test_byte_identical_copies_under_two_names_count_once():
    docs = [Document("a.txt", "same"), Document("b.txt", "same"), Document("c.txt", "other")]
    assert [d.name for d in dedupe(docs)] == ["a.txt", "c.txt"]
    corpus = split_documents("x", docs + [Document("d.txt", "same")])
    names = [d.name for d in corpus.train + corpus.eval]
    assert sorted(names) == ["a.txt", "c.txt"]


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"   \n\n", "empty"),
    (b"\x00\x01\x02binary\x00", "binary"),
    (b"\xff\xfe\xfa not utf8", "not UTF-8"),
])
def test_unreadable_data_files_are_refused(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(PlannerError, match=message):
        load_corpus(DataSource.parse(str(path)))


def test_utf8_with_bom_is_read_as_text(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello".encode("utf-8"))
    assert read_text_file(path) == "hello"


def test_folder_without_text_files_is_refused(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(PlannerError, match="no text files"):
        load_corpus(DataSource.parse(str(tmp_path)))


@pytest.mark.parametrize("spec, kind, location, config", [
    ("builtin:shakespeare", "builtin", "shakespeare", None),
    ("wikitext:wikitext-2-raw-v1", "datasets", "wikitext", "wikitext-2-raw-v1"),
    ("tiny_shakespeare", "datasets", "tiny_shakespeare", None),
])
def test_data_sources_are_recognised(spec, kind, location, config):
    source = DataSource.parse(spec)
    assert (source.kind, source.location, source.config) == (kind, location, config)


@pytest.mark.parametrize("spec, message", [
    ("builtin:nope", "unknown built-in corpus"),
    ("missing/corpus.txt", "does not exist"),
    ("./missing", "does not exist"),
])
def test_bad_data_sources_are_refused(spec, message):
    with pytest.raises(PlannerError, match=message):
        DataSource.parse(spec)


def test_model_sources_are_recognised(tiny_model_dir):
    assert ModelSource.parse("builtin:smollm2-135m").kind == "builtin"
    assert ModelSource.parse("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    local = ModelSource.parse(str(tiny_model_dir))
    assert local.kind == "local" and local.location == str(tiny_model_dir.resolve())


@pytest.mark.parametrize("spec, message", [
    ("builtin:gpt-5", "unknown built-in model"),
    ("/nonexistent/model", "does not exist"),
    ("./models/nope", "does not exist"),
])
def test_bad_model_sources_are_refused(spec, message):
    with pytest.raises(PlannerError, match=message):
        ModelSource.parse(spec)


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(PlannerError, match="no config.json"):
        ModelSource.parse(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(PlannerError, match="is a file"):
        ModelSource.parse(str(tmp_path / "weights.bin"))


def test_local_model_folder_loads_as_a_causal_lm(tiny_model_dir):
    model, tokenizer = load_model(ModelSource.parse(str(tiny_model_dir)), torch.device("cpu"), torch.float32)
    assert not model.training
    ids = tokenizer("Shall I compare thee", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_non_causal_model_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(PlannerError, match="'bert' model, not a causal language model"):
        load_model(ModelSource.parse(str(tmp_path)), torch.device("cpu"))


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(PlannerError, match="unknown device"):
        resolve_device("tpu-ish")
    with pytest.raises(PlannerError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(PlannerError, match="CUDA is not available"):
            resolve_device("cuda")


def _fake_hub_dataset(monkeypatch, splits):
    import datasets

    calls = []

    def load_dataset(path, name=None):
        calls.append((path, name))
        return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_datasets_corpus_uses_its_own_train_and_test_splits(monkeypatch):
    calls = _fake_hub_dataset(monkeypatch, {
        "train": {"text": ["first line", "second line"], "id": [1, 2]},
        "validation": {"text": ["validation line"], "id": [3]},
        "test": {"text": ["held out", "text"], "id": [4, 5]},
    })
    corpus = load_corpus(DataSource.parse("wikitext:wikitext-2-raw-v1"))
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert [d.text for d in corpus.train] == ["first line\nsecond line"]
    assert [d.text for d in corpus.eval] == ["held out\ntext"]
    assert corpus.split_rule.endswith("train / test")


def test_datasets_corpus_finds_a_string_column_and_falls_back_to_validation(monkeypatch):
    _fake_hub_dataset(monkeypatch, {"train": {"n": [1], "content": ["a"]}, "validation": {"n": [2], "content": ["b"]}})
    corpus = load_corpus(DataSource.parse("some_corpus"))
    assert (corpus.train[0].text, corpus.eval[0].text) == ("a", "b")


@pytest.mark.parametrize("splits, message", [
    ({"train": {"text": ["a"]}}, "needs a train split and a test or validation split"),
    ({"train": {"n": [1]}, "test": {"n": [2]}}, "no text column"),
    ({"train": {"text": ["a"]}, "test": {"text": ["  "]}}, "empty test split"),
])
def test_unusable_datasets_are_refused(monkeypatch, splits, message):
    _fake_hub_dataset(monkeypatch, splits)
    with pytest.raises(PlannerError, match=message):
        load_corpus(DataSource.parse("some_corpus"))
