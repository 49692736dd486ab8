"""Saving and loading compressed models: exact round trips, kept sharing, clear errors."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from basis_sharing.calibration.grams import collect_grams
from basis_sharing.errors import UserError
from basis_sharing.evaluation.params import count_projection_weights, count_total
from basis_sharing.hashing import file_sha256
from basis_sharing.methods.basis_sharing import SVDLLM, BasisSharing, BasisSharingMethodConfig
from basis_sharing.methods.factorized import WhitenedSVDMethodConfig
from basis_sharing.methods.registry import CompressionContext
from basis_sharing.models.compressed_io import (
    MANIFEST,
    WEIGHTS,
    CompressedModelError,
    load_compressed,
    save_compressed,
)
from basis_sharing.models.families import family_for_model_type
from basis_sharing.models.integrity import seal
from basis_sharing.modules import LowRankLinear, SharedBasisLinear

CASES = [
    ("llama", "basis_sharing"),
    ("mistral", "basis_sharing"),
    ("opt", "basis_sharing"),
    ("gpt2", "basis_sharing"),
    ("llama", "svd_llm"),
]
PROBE = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(11))
INFO = {"method": "basis_sharing", "ratio": 0.3, "groups": [[0, 1], [2, 3]], "base": "tiny"}


def method(name: str = "basis_sharing", **kw):
    schema = BasisSharingMethodConfig if name == "basis_sharing" else WhitenedSVDMethodConfig
    cfg = OmegaConf.merge(OmegaConf.structured(schema), {"name": name, **kw})
    return BasisSharing(cfg) if name == "basis_sharing" else SVDLLM(cfg)


@functools.cache
def compressed(family_name: str, method_name: str):
    """A tiny model of ``family_name`` compressed at 30 % (group size 2 for Basis Sharing).

    Cached: compressing dominates the run time, and the tests only read these models.
    """
    model = make_tiny_model(family_name, dtype=torch.float64)
    family = family_for_model_type(model.config.model_type)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_grams(model, family, ids, batch_size=4, accumulate_dtype=torch.float64)
    kw = {"group_size": 2} if method_name == "basis_sharing" else {}
    ctx = CompressionContext(ratio=0.3, device=torch.device("cpu"), stats={"gram": stats})
    method(method_name, **kw).compress(model, family, ctx)
    return model, family


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """One compressed LLaMA saved once; tamper tests work on copies of it."""
    model, family = compressed("llama", "basis_sharing")
    path = save_compressed(model, tmp_path_factory.mktemp("bs") / "llama", family=family, info=INFO)
    return path, model


@pytest.fixture
def llama_copy(saved_llama, tmp_path) -> Path:
    return Path(shutil.copytree(saved_llama[0], tmp_path / "copy"))


@pytest.mark.parametrize("family_name,method_name", CASES)
def test_round_trip_is_exact(family_name, method_name, tmp_path):
    model, family = compressed(family_name, method_name)
    path = save_compressed(model, tmp_path / "out", family=family, info=INFO)
    loaded = load_compressed(path)
    assert torch.equal(logits(loaded.model), logits(model))
    assert count_total(loaded.model) == count_total(model)
    assert count_projection_weights(loaded.model, family) == count_projection_weights(model, family)
    assert loaded.family is family and loaded.tokenizer is None and not loaded.model.training
    assert loaded.manifest["info"] == INFO and loaded.manifest["family"] == family_name
    for old, new in zip(family.layers(model), family.layers(loaded.model), strict=True):
        for kind in family.kinds:
            a, b = family.module(old, kind), family.module(new, kind)
            assert type(a) is type(b) and getattr(a, "rank", None) == getattr(b, "rank", None)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family_name in ("opt", "gpt2"))
    out_embeddings = loaded.model.get_output_embeddings().weight
    assert (out_embeddings is loaded.model.get_input_embeddings().weight) == tied
    assert {p.name for p in path.iterdir()} == {
        WEIGHTS,
        MANIFEST,
        "config.json",
        "generation_config.json",
    }


def test_shared_bases_stay_shared(saved_llama):
    loaded = load_compressed(saved_llama[0])
    family, model = loaded.family, loaded.model
    layers = family.layers(model)
    q0, q1, q2 = (family.module(layers[i], "q") for i in range(3))
    assert isinstance(q0, SharedBasisLinear) and isinstance(
        family.module(layers[0], "o"), LowRankLinear
    )
    assert q0.basis is q1.basis is model.shared_bases["q_g0"]
    assert q2.basis is model.shared_bases["q_g1"] is not q0.basis
    assert [n for n, _ in model.named_parameters() if "q_g0" in n] == ["shared_bases.q_g0.weight"]


def test_layout_lists_exactly_the_compressed_projections(saved_llama):
    manifest = json.loads((saved_llama[0] / MANIFEST).read_text())
    layout = {(e["layer"], e["kind"]): e for e in manifest["layout"]}
    assert len(layout) == 4 * 7
    assert layout[(1, "q")] == {
        "layer": 1,
        "kind": "q",
        "type": "shared",
        "rank": layout[(0, "q")]["rank"],
        "d_in": 64,
        "d_out": 64,
        "bias": False,
        "basis_key": "q_g0",
    }
    assert layout[(0, "o")]["type"] == "lowrank" and layout[(0, "o")]["basis_key"] is None
    assert set(manifest["packages"]) >= {"torch", "transformers", "basis-sharing"}
    assert manifest["format_version"] == 2 and "weights_sha256" not in manifest
    files = {p.name for p in saved_llama[0].iterdir()} - {MANIFEST}
    assert manifest["files"] == {
        name: {
            "sha256": file_sha256(saved_llama[0] / name),
            "bytes": (saved_llama[0] / name).stat().st_size,
        }
        for name in files
    }
    assert set(manifest["sections_sha256"]) == set(manifest) - {"sections_sha256"}


def test_dense_model_is_never_materialised(saved_llama, monkeypatch):
    original = AutoModelForCausalLM.from_config
    seen = []

    def spy(config, **kwargs):
        model = original(config, **kwargs)
        seen.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", spy)
    loaded = load_compressed(saved_llama[0])
    assert seen == ["meta"]
    assert all(not p.is_meta for p in loaded.model.parameters())
    assert torch.equal(logits(loaded.model), logits(saved_llama[1]))


def test_tokenizer_and_dtype(tiny_tokenizer, tmp_path, saved_llama):
    model = saved_llama[1]
    family = family_for_model_type(model.config.model_type)
    path = save_compressed(model, tmp_path / "tok", family=family, tokenizer=tiny_tokenizer)
    loaded = load_compressed(path, dtype="float32")
    text = "the king of the north"
    assert loaded.tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(loaded.model).double(), logits(model), rtol=1e-4, atol=1e-4)


def test_dense_model_round_trips(tmp_path):
    model = make_tiny_model("opt")
    family = family_for_model_type("opt")
    loaded = load_compressed(save_compressed(model, tmp_path / "dense", family=family))
    assert loaded.manifest["layout"] == []
    assert not hasattr(loaded.model, "shared_bases")
    assert torch.equal(logits(loaded.model), logits(model))
    assert count_total(loaded.model) == count_total(model)


def test_non_empty_directory_is_refused(saved_llama, tmp_path):
    model, family = saved_llama[1], family_for_model_type("llama")
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(CompressedModelError, match="not empty"):
        save_compressed(model, target, family=family)
    with pytest.raises(CompressedModelError, match="not a compressed-model directory"):
        save_compressed(model, target, family=family, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    (target / "notes.txt").unlink()  # an empty directory is fine
    save_compressed(model, target, family=family, info={"run": 1})
    with pytest.raises(CompressedModelError, match="overwrite=True"):
        save_compressed(model, target, family=family, info={"run": 2})
    save_compressed(model, target, family=family, info={"run": 2}, overwrite=True)
    assert load_compressed(target).manifest["info"] == {"run": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no staging leftovers


def test_unknown_module_is_refused(tmp_path):
    model = make_tiny_model("llama")
    family = family_for_model_type("llama")
    family.set_module(family.layers(model)[1], "k", torch.nn.Identity())
    with pytest.raises(CompressedModelError, match="layer 1 projection 'k'.*Identity"):
        save_compressed(model, tmp_path / "x", family=family)
    assert not (tmp_path / "x").exists()


def _edit_manifest(path: Path, edit) -> None:
    """Edit compression.json and reseal it, as a writer's bug would: the edit passes the section
    digests (tests/test_saved_integrity.py covers those), so the checks behind them are reached."""
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    seal(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _flip_byte(path: Path) -> None:
    data = bytearray((path / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / WEIGHTS).write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper,match",
    [
        (_flip_byte, "model.safetensors does not match the checksum"),
        (lambda p: _edit_manifest(p, lambda m: m.pop("layout")), "compression.json lacks.*layout"),
        (
            lambda p: _edit_manifest(p, lambda m: m.update(format_version=7)),
            "compression.json has format_version 7",
        ),
        (
            lambda p: _edit_manifest(p, lambda m: m.update(family="bloom")),
            "compression.json names the unknown model family 'bloom'",
        ),
        (lambda p: (p / MANIFEST).write_text("{not json"), "compression.json is not valid JSON"),
        (
            lambda p: _edit_manifest(p, lambda m: m["layout"][3].update(rank=-1)),
            r"compression.json has a malformed layout:\n  layout\[3\]: 'rank'",
        ),
        (lambda p: (p / MANIFEST).unlink(), "compression.json not found"),
    ],
    ids=["byte-flip", "no-layout", "format-version", "family", "not-json", "bad-rank", "missing"],
)
def test_tampering_fails_before_building(llama_copy, monkeypatch, tamper, match):
    def fail(*args, **kwargs):
        raise AssertionError("a model was built from an invalid directory")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", fail)
    tamper(llama_copy)
    with pytest.raises(CompressedModelError, match=match) as err:
        load_compressed(llama_copy)
    assert isinstance(err.value, UserError)


def test_changed_rank_reports_the_shape_mismatch(llama_copy):
    def shrink_o(manifest):
        entry = next(e for e in manifest["layout"] if (e["layer"], e["kind"]) == (2, "o"))
        entry["rank"] -= 1

    _edit_manifest(llama_copy, shrink_o)
    with pytest.raises(
        CompressedModelError,
        match=r"layers\.2\.self_attn\.o_proj\.basis\.weight: model.safetensors has shape",
    ):
        load_compressed(llama_copy)


def test_inconsistent_shared_rank_is_reported(llama_copy):
    _edit_manifest(llama_copy, lambda m: m["layout"][0].update(rank=m["layout"][0]["rank"] + 1))
    with pytest.raises(CompressedModelError, match="basis 'q_g0' has"):
        load_compressed(llama_copy)


def test_layer_out_of_range_is_reported(llama_copy):
    _edit_manifest(llama_copy, lambda m: m["layout"][-1].update(layer=9))
    with pytest.raises(CompressedModelError, match="lists layer 9 but .* has 4 decoder layers"):
        load_compressed(llama_copy)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_loads_onto_cuda(saved_llama, dtype):
    loaded = load_compressed(saved_llama[0], device="cuda", dtype=dtype).model
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert all(t.device.type == "cuda" for t in tensors)
    assert {p.dtype for p in loaded.parameters()} == {dtype or torch.float64}
    on_gpu = logits(loaded, PROBE.cuda()).double().cpu()
    tol = 1e-6 if dtype is None else 0.1  # RoPE runs in float32 on either device
    torch.testing.assert_close(on_gpu, logits(saved_llama[1]), rtol=tol, atol=tol)
