"""Load a causal LM and its tokenizer from a local directory, an embedded GGUF package or the hub.

Sources, first match wins (see ``ModelConfig``):
- ``local_path``: a directory written by ``save_pretrained`` (or a hub snapshot copied by hand);
- ``gguf_package``: a GGUF file inside an installed Python package, dequantised once by
  transformers and cached as safetensors under ``<cache_dir>/models`` (see ``gguf_cache``);
- ``hf_id``: a hub repository, pinned by ``revision``; used from the local HF cache when it is
  there, downloaded otherwise, and a clear error when neither works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from basis_sharing.config import TORCH_DTYPES
from basis_sharing.errors import ConfigError, HubUnreachableError
from basis_sharing.hub import hub_available
from basis_sharing.models.families import FamilyAdapter, family_for_model_type, get_family
from basis_sharing.models.gguf_cache import embedded_gguf_path, ensure_converted

log = logging.getLogger(__name__)

# Weight formats a snapshot download skips: one format of the weights is enough.
_SKIP_ALWAYS = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.tflite", "*.gguf", "original/*"]


@dataclass
class ModelSource:
    """A directory from_pretrained can read, and where it came from (for the run record)."""

    path: Path
    provenance: dict[str, Any] = field(default_factory=dict)


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ConfigError(
            f"Unknown model.dtype '{name}'. Valid choices: {', '.join(TORCH_DTYPES)}."
        )
    return getattr(torch, name)


def resolve_source(model_cfg, cache_dir: str | Path, offline: bool = False) -> ModelSource:
    """Find (and if needed convert or download) the model directory; no weights are loaded."""
    if model_cfg.local_path:
        path = Path(model_cfg.local_path).expanduser()
        check_model_dir(path, "model.local_path")
        return ModelSource(
            path,
            {
                "source": "local",
                "path": str(path.resolve()),
                "weights_fingerprint": weights_fingerprint(path),
            },
        )
    if model_cfg.gguf_package:
        gguf = embedded_gguf_path(model_cfg.gguf_package, model_cfg.gguf_file)
        path, info = ensure_converted(gguf, model_cfg.dtype, Path(cache_dir).expanduser())
        return ModelSource(
            path, {"source": "gguf-package", "package": model_cfg.gguf_package, **info}
        )
    if model_cfg.hf_id:
        path = hub_snapshot(model_cfg.hf_id, model_cfg.revision, model_cfg.name, offline)
        return ModelSource(
            path,
            {
                "source": "hub",
                "hf_id": model_cfg.hf_id,
                "revision": model_cfg.revision,
                "commit": path.name,
            },
        )
    raise ConfigError(
        f"model '{model_cfg.name}' names no source: set model.local_path, model.gguf_package "
        "or model.hf_id."
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_model_dir(path: Path, key: str) -> None:
    """Refuse a model directory without a config or without weights, before anything else runs."""
    if not path.is_dir():
        raise ConfigError(
            f"{key}={path} does not exist or is not a directory. Point it at a directory written "
            "by save_pretrained or downloaded from the hub (config.json, weights, tokenizer)."
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{key}={path} is not a model directory (no config.json). Point it at "
            "a directory written by save_pretrained or downloaded from the hub."
        )
    if not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir() if f.is_file()):
        present = sorted(f.name for f in path.iterdir())
        raise ConfigError(
            f"{key}={path} has a config.json but no weights (*.safetensors or *.bin; the "
            f"directory holds {present}). Copy the weight files next to config.json."
        )


def read_model_config(path: Path):
    """The transformers config of a model directory (config.json only, no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        file = path / "config.json"
        raise ConfigError(f"{file} cannot be read as a model config: {err}") from err


def meta_model(hf_config) -> torch.nn.Module:
    """The model of ``hf_config`` with every tensor on the meta device: shapes without memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(hf_config)


def weights_fingerprint(path: Path) -> str:
    """sha256 over the names, sizes and mtimes of a directory's weight files (cheap, no reading)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES:
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:24]


def hub_snapshot(hf_id: str, revision: str | None, name: str, offline: bool) -> Path:
    """Local snapshot directory of a hub repository, downloading it only when needed."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hf_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if not hub_available(offline):
        raise HubUnreachableError(
            f"Model '{name}' ({hf_id}, revision {revision or 'main'}) is not in the local "
            "Hugging Face cache and the hub is unreachable (no network, HF_HUB_OFFLINE=1 or "
            f"offline=true). Point at a local copy instead:\n"
            f"    python run.py model={name} model.local_path=/path/to/{hf_id.split('/')[-1]}\n"
            "where the directory holds config.json, the weights and the tokenizer files (e.g. "
            f"from `hf download {hf_id} --local-dir /path/to/{hf_id.split('/')[-1]}` on a "
            "connected machine), or set HF_HOME to a Hugging Face cache that has it."
        )
    files = HfApi().list_repo_files(hf_id, revision=revision)
    skip = list(_SKIP_ALWAYS)
    if any(f.endswith(".safetensors") for f in files):
        skip += ["*.bin", "*.pt", "*.pth"]
    log.info("Downloading %s (revision %s) from the Hugging Face hub", hf_id, revision or "main")
    return Path(snapshot_download(hf_id, revision=revision, ignore_patterns=skip))


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)


def load_model(
    model_cfg, source: ModelSource, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, FamilyAdapter]:
    """Load weights in ``model_cfg.dtype``, in eval mode, on ``device``, with its family adapter."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(model_cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    model.eval().to(device)
    family = (
        get_family(model_cfg.family)
        if model_cfg.family
        else family_for_model_type(model.config.model_type)
    )
    check_context_length(model.config, model_cfg.context_length, model_cfg.name)
    return model, family


def max_positions(hf_config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, int):
            return value
    return None


def check_context_length(hf_config, context_length: int, name: str) -> None:
    limit = max_positions(hf_config)
    if limit is not None and context_length > limit:
        raise ConfigError(
            f"model.context_length={context_length} exceeds what model '{name}' supports "
            f"({limit} positions). Set model.context_length<={limit}."
        )
