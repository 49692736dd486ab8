"""Saved compressed models: every file checksummed, old saves handled, overwriting chosen."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import compose_config, make_tiny_model, tiny_run_overrides
from torch import nn
from transformers import AutoModelForCausalLM

from basis_sharing import pipeline
from basis_sharing.errors import UserError
from basis_sharing.models import compressed_io
from basis_sharing.models.compressed_io import (
    MANIFEST,
    WEIGHTS,
    CompressedModelError,
    load_compressed,
    read_manifest,
    require_tokenizer,
    save_compressed,
)
from basis_sharing.models.families import family_for_model_type
from basis_sharing.models.integrity import seal
from basis_sharing.modules import LowRankLinear, SharedBasisLinear, shared_bases
from basis_sharing.stages import prepare as prepare_stages

INFO = {"method": "basis_sharing", "target_ratio": 0.3, "model_name": "tiny"}
PROBE = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(5))
SAVED_FILES = {
    WEIGHTS,
    MANIFEST,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)


@functools.cache
def factorised_llama():
    """A tiny LLaMA with a private low-rank q in layer 0 and a k basis shared by layers 0-1.

    The factors are random: these tests check files, not the quality of a compression.
    """
    model = make_tiny_model("llama", dtype=torch.float64)
    family = family_for_model_type("llama")
    layers = family.layers(model)
    family.set_module(layers[0], "q", LowRankLinear(linear(64, 8), linear(8, 64)))
    registry = shared_bases(model)
    registry["k_g0"] = linear(64, 8)
    for layer in layers[:2]:
        family.set_module(layer, "k", SharedBasisLinear(registry, "k_g0", linear(8, 32)))
    return model, family


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer) -> Path:
    model, family = factorised_llama()
    target = tmp_path_factory.mktemp("saved") / "model"
    return save_compressed(model, target, family=family, tokenizer=tiny_tokenizer, info=INFO)


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


@pytest.fixture
def no_model_built(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was built from a damaged directory")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", fail)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def set_rope_theta(config: dict) -> None:
    """Changed only in config.json this loaded silently: perplexity 178 instead of 130."""
    holder = config.get("rope_parameters") or config
    assert "rope_theta" in holder
    holder["rope_theta"] = holder["rope_theta"] * 2


def edit_tokenizer(path: Path) -> None:
    def swap_two_tokens(data):
        vocab = data["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[10:12]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    edit_json(path / "tokenizer.json", swap_two_tokens)


def truncate_weights(path: Path) -> None:
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[:-100])


def add_files_entry(manifest: dict) -> None:
    manifest["files"]["../outside.json"] = dict(manifest["files"]["config.json"])
    seal(manifest)  # as a buggy writer would: the section digests pass, the list is checked


def test_every_file_is_listed_with_its_checksum(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    assert {p.name for p in saved.iterdir()} == SAVED_FILES
    assert set(manifest["files"]) == SAVED_FILES - {MANIFEST}
    assert set(manifest["sections_sha256"]) == {
        "format_version",
        "family",
        "layout",
        "info",
        "files",
        "packages",
    }
    loaded = load_compressed(saved)
    assert torch.equal(logits(loaded.model), logits(factorised_llama()[0]))
    assert loaded.manifest["info"] == INFO and loaded.tokenizer is not None


DAMAGE = [
    (
        lambda p: edit_json(p / "config.json", set_rope_theta),
        r"copy/config\.json does not match the checksum in .*copy/compression\.json \(sha256 ",
    ),
    (
        lambda p: edit_json(p / "generation_config.json", lambda g: g.update(temperature=0.1)),
        r"copy/generation_config\.json does not match the checksum",
    ),
    (
        lambda p: edit_json(p / MANIFEST, lambda m: m["info"].update(method="svd_llm")),
        r"compression\.json was edited after saving: section\(s\) \['info'\] changed .*"
        r"mislabel the run record",
    ),
    (
        lambda p: edit_json(p / MANIFEST, lambda m: m["info"].update(target_ratio=0.5)),
        r"compression\.json was edited after saving: section\(s\) \['info'\] changed",
    ),
    (
        lambda p: edit_json(p / MANIFEST, lambda m: m["layout"][0].update(rank=7)),
        r"section\(s\) \['layout'\] changed .*Restore the original compression\.json",
    ),
    (
        lambda p: edit_json(p / MANIFEST, lambda m: m.update(note="mine")),
        r"section\(s\) \['note'\] were added",
    ),
    (
        lambda p: edit_json(p / MANIFEST, lambda m: m.pop("packages")),
        r"section\(s\) \['packages'\] were removed",
    ),
    (edit_tokenizer, r"copy/tokenizer\.json does not match the checksum"),
    (
        lambda p: (p / "tokenizer.json").unlink(),
        r"copy is incomplete: tokenizer\.json is missing \(saved with the model and listed in "
        r"compression\.json\)\. Restore the missing files",
    ),
    (
        lambda p: [(p / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        r"incomplete: tokenizer\.json, tokenizer_config\.json are missing",
    ),
    (lambda p: (p / "config.json").unlink(), r"incomplete: config\.json is missing"),
    (
        lambda p: (p / "special_tokens_map.json").write_text("{}"),
        r"holds \['special_tokens_map\.json'\], which was not saved with the model",
    ),
    (truncate_weights, r"copy/model\.safetensors has \d+ bytes but had \d+ when it was saved"),
    (
        lambda p: edit_json(p / MANIFEST, add_files_entry),
        r"malformed 'files' list:\n  '\.\./outside\.json' is not a file name",
    ),
]
DAMAGE_IDS = [
    "config-rope-theta",
    "generation-config",
    "info-method",
    "info-target-ratio",
    "layout-rank",
    "added-section",
    "removed-section",
    "tokenizer-edited",
    "tokenizer-deleted",
    "tokenizer-both-deleted",
    "config-deleted",
    "unlisted-file",
    "weights-truncated",
    "files-path",
]


@pytest.mark.parametrize("damage,match", DAMAGE, ids=DAMAGE_IDS)
def test_damage_is_refused_before_a_model_is_built(copy, no_model_built, damage, match):
    damage(copy)
    with pytest.raises(CompressedModelError, match=match) as by_reader:
        read_manifest(copy)  # what pipeline.validate calls before anything heavy
    with pytest.raises(CompressedModelError, match=match) as by_loader:
        load_compressed(copy)
    assert str(by_reader.value) == str(by_loader.value)
    assert isinstance(by_loader.value, UserError)


def test_weights_are_hashed_when_loaded(copy, no_model_built):
    # Same size, one bit changed: read_manifest leaves the one large hash to load_compressed.
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / WEIGHTS).write_bytes(bytes(data))
    read_manifest(copy)
    with pytest.raises(CompressedModelError, match=r"copy/model\.safetensors does not match"):
        load_compressed(copy)


def test_hidden_files_are_ignored(copy):
    (copy / ".DS_Store").write_bytes(b"\0\1")
    loaded = load_compressed(copy)
    assert torch.equal(logits(loaded.model), logits(factorised_llama()[0]))


def as_format_1(path: Path) -> None:
    """Rewrite the manifest as the previous format wrote it: a checksum of the weights only."""

    def downgrade(manifest):
        weights = manifest.pop("files")[WEIGHTS]["sha256"]
        manifest.pop("sections_sha256")
        manifest.update(format_version=1, weights_sha256=weights)

    edit_json(path / MANIFEST, downgrade)


def test_format_1_loads_with_a_warning_that_it_is_partly_verified(copy, caplog):
    as_format_1(copy)
    with caplog.at_level(logging.WARNING, logger="basis_sharing.models.integrity"):
        loaded = load_compressed(copy)
    assert torch.equal(logits(loaded.model), logits(factorised_llama()[0]))
    assert loaded.manifest["info"] == INFO
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "saved in format version 1, which checksums only" in warnings[0]
    assert (
        "config.json, generation_config.json, the tokenizer files and the manifest's info"
        in (warnings[0])
    )
    assert "Save the model again" in warnings[0]


def test_format_1_still_verifies_its_weights_and_tokenizer(copy, no_model_built):
    as_format_1(copy)
    truncate_weights(copy)
    with pytest.raises(CompressedModelError, match=r"model\.safetensors does not match"):
        load_compressed(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CompressedModelError, match=r"incomplete: tokenizer\.json is missing"):
        read_manifest(copy)


def test_resaving_a_format_1_model_gives_full_checksums(copy, tmp_path):
    as_format_1(copy)
    loaded = load_compressed(copy)
    resaved = save_compressed(
        loaded.model,
        tmp_path / "resaved",
        family=loaded.family,
        tokenizer=loaded.tokenizer,
        info=loaded.manifest["info"],
    )
    manifest = json.loads((resaved / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and set(manifest["files"]) == SAVED_FILES - {MANIFEST}
    assert torch.equal(logits(load_compressed(resaved).model), logits(factorised_llama()[0]))


def test_a_model_saved_without_tokenizer_cannot_be_evaluated(tmp_path, no_model_built):
    model, family = factorised_llama()
    path = save_compressed(model, tmp_path / "bare", family=family)
    manifest, _ = read_manifest(path)
    with pytest.raises(CompressedModelError, match=r"bare was saved without a tokenizer"):
        require_tokenizer(path, manifest)
    cfg = compose_config("method=none", f"load_model={path}", "device=cpu")
    with pytest.raises(CompressedModelError, match="saved without a tokenizer"):
        pipeline.validate(cfg)


def test_validation_refuses_an_edited_config(copy, no_model_built):
    edit_json(copy / "config.json", set_rope_theta)
    cfg = compose_config("method=none", f"load_model={copy}", "model=local", "device=cpu")
    with pytest.raises(CompressedModelError, match=r"config\.json does not match the checksum"):
        pipeline.validate(cfg)


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_files_get_the_umask_modes(tmp_path, umask, file_mode, dir_mode, tiny_tokenizer):
    model, family = factorised_llama()
    previous = os.umask(umask)
    try:
        path = save_compressed(model, tmp_path / "shared", family=family, tokenizer=tiny_tokenizer)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == dir_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert modes == dict.fromkeys(SAVED_FILES, file_mode)


# --------------------------------------------------------------------------------------------
# Overwriting


def saved_run(tmp_path: Path, run: int) -> Path:
    model, family = factorised_llama()
    return save_compressed(model, tmp_path / "out", family=family, info={"run": run})


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "out")


def test_an_interrupted_overwrite_keeps_the_earlier_save(tmp_path, monkeypatch):
    saved_run(tmp_path, 1)
    model, family = factorised_llama()

    def interrupted(directory):
        raise KeyboardInterrupt  # after the weights, config and tokenizer are written

    monkeypatch.setattr(compressed_io.integrity, "file_checksums", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, tmp_path / "out", family=family, info={"run": 2}, overwrite=True)
    assert load_compressed(tmp_path / "out").manifest["info"] == {"run": 1}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_overwrite_replaces_the_earlier_save(tmp_path, monkeypatch, exchange):
    saved_run(tmp_path, 1)
    (tmp_path / "out" / ".mark").write_text("from run 1")
    calls = []
    real = compressed_io._exchange

    def spy(a, b):
        calls.append((a.parent, b))
        return real(a, b) if exchange else False

    monkeypatch.setattr(compressed_io, "_exchange", spy)
    model, family = factorised_llama()
    save_compressed(model, tmp_path / "out", family=family, info={"run": 2}, overwrite=True)
    assert calls == [(tmp_path, tmp_path / "out")]
    assert load_compressed(tmp_path / "out").manifest["info"] == {"run": 2}
    assert not (tmp_path / "out" / ".mark").exists() and leftovers(tmp_path) == []


def test_the_atomic_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not compressed_io._exchange(a, b):
        pytest.skip("this file system has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_failed_move_puts_the_earlier_save_back(tmp_path, monkeypatch):
    saved_run(tmp_path, 1)
    monkeypatch.setattr(compressed_io, "_exchange", lambda a, b: False)
    real_rename = Path.rename

    def rename(self, target):
        if ".partial-" in self.name:
            raise OSError("disk went away")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    model, family = factorised_llama()
    with pytest.raises(OSError, match="disk went away"):
        save_compressed(model, tmp_path / "out", family=family, info={"run": 2}, overwrite=True)
    monkeypatch.undo()
    assert load_compressed(tmp_path / "out").manifest["info"] == {"run": 1}
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# The pipeline's save_model


def run_cfg(model_dir: Path, mirror: Path, *overrides: str):
    return compose_config(
        *tiny_run_overrides(
            model_dir,
            mirror,
            "eval.ppl_datasets=[wikitext2]",
            "device=cpu",
            "save_model=true",
            *overrides,
        )
    )


def test_save_model_over_an_earlier_save_is_refused_before_the_model_loads(
    tiny_model_dir, tiny_mirror, tmp_path, monkeypatch
):
    saved_run(tmp_path, 1)  # tmp_path / "out" plays the run directory's compressed_model
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "out").rename(run_dir / "compressed_model")

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prepare_stages, "load_model", fail)
    monkeypatch.setattr(prepare_stages, "resolve_source", fail)
    cfg = run_cfg(tiny_model_dir, tiny_mirror, "force=true")
    with pytest.raises(CompressedModelError) as err:
        pipeline.run(cfg, out_dir=run_dir)
    assert str(err.value) == (
        f"Cannot save a compressed model to {run_dir / 'compressed_model'}: the directory is not "
        "empty. Choose another directory or set save_model_overwrite=true to replace a "
        "compressed model saved there."
    )
    assert not (run_dir / "results.json").exists()
    assert load_compressed(run_dir / "compressed_model").manifest["info"] == {"run": 1}


def test_force_rerun_with_save_model_overwrite_replaces_the_save(
    tiny_model_dir, tiny_mirror, tmp_path
):
    run_dir = tmp_path / "run"
    first = pipeline.run(run_cfg(tiny_model_dir, tiny_mirror), out_dir=run_dir)
    saved = run_dir / "compressed_model"
    assert first["status"] == "completed" and first["saved_model"] == str(saved)
    (saved / ".mark").write_text("first save")
    with pytest.raises(CompressedModelError, match="set save_model_overwrite=true"):
        pipeline.run(run_cfg(tiny_model_dir, tiny_mirror, "force=true"), out_dir=run_dir)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    again = pipeline.run(
        run_cfg(tiny_model_dir, tiny_mirror, "force=true", "save_model_overwrite=true"),
        out_dir=run_dir,
    )
    assert again["status"] == "completed" and not (saved / ".mark").exists()
    assert again["metrics"]["perplexity"] == first["metrics"]["perplexity"]
    assert load_compressed(saved).manifest["info"]["method"] == "dense"
    assert not [p.name for p in run_dir.iterdir() if ".partial-" in p.name or ".old-" in p.name]
