"""On-disk cache of calibration statistics: a sweep computes them once (docs/architecture.md §4.2).

A ratio or group-size sweep, or a second method, needs the same statistics: they depend only on the
model, the calibration tokens and a few settings, which ``stats_key`` hashes. Every statistic uses
one file format: ``<cache_dir>/stats/<key>.safetensors`` holds its named tensors, and the
metadata repeats the key, the format version and the statistic's name (``stat``), lists the tensors
in order, stores the statistic's JSON scalars (``fields``: token and batch counts, dtype), a sha256
over each tensor's name, dtype, shape and bytes, and the caller's provenance (``meta``, unchecked).

A file that fails any check (unreadable, another key, format or statistic, a listed tensor missing,
a non-finite value, a checksum mismatch, or the statistic's own ``decode`` check) is never used: the
lookup logs a warning naming the file and the reason, and the caller recomputes and overwrites it.
Files are published by an atomic rename, so concurrent jobs see a complete file or none.

Gram files written before the format was shared by every statistic (an entry list and a sha256 of
the bytes alone) are still read and verified, so their keys, unchanged, stay hits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from basis_sharing.errors import ConfigError
from basis_sharing.files import new_file_mode

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The ``stat`` name of Gram files (absent from Gram files written before other statistics existed).
GRAMS = "grams"
# Half precision would overflow and lose the small eigenvalues the whitening needs (fp32 as in the
# reference code; fp64 for exact tests or very long calibration runs).
ACCUMULATE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}

T = TypeVar("T")
Fields = dict[str, Any]  # JSON-able scalars stored beside the tensors (token and batch counts)
Tensors = dict[str, torch.Tensor]


class StatsCacheError(Exception):
    """A cache file is unusable; the message says why."""


def accumulate_dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name ("float32" or "float64") of an accumulation dtype given as dtype or string.

    Raises:
        ConfigError: any other dtype (half precision is refused, see ACCUMULATE_DTYPES).
    """
    name = str(dtype).removeprefix("torch.")
    if name not in ACCUMULATE_DTYPES:
        raise ConfigError(
            f"Unsupported Gram accumulation dtype '{name}'. Valid choices: "
            f"{', '.join(ACCUMULATE_DTYPES)}."
        )
    return name


def stats_key(
    model_identity: dict[str, Any],
    calibration_hash: str,
    accumulate_dtype: torch.dtype | str,
    stat: str = GRAMS,
    params: dict[str, Any] | None = None,
) -> str:
    """24 hex chars of sha256 over a canonical JSON of everything the statistics depend on.

    Args:
        model_identity: JSON-able description of the weights (id, revision/commit or GGUF sha256,
            dtype, tokenizer).
        calibration_hash: sha256 of the calibration token ids (pins dataset, split, sampler, seed).
        accumulate_dtype: "float32" or "float64" (a torch dtype is accepted too).
        stat: which statistic ("grams", or e.g. "scales", "fisher"); keys differ per statistic.
        params: JSON-able settings the statistic depends on beyond the above (ASVD's abs_mean and
            FWSVD's Fisher sum per-batch quantities, so they depend on the batch size).
    """
    payload: dict[str, Any] = {
        "model": model_identity,
        "calibration": calibration_hash,
        "accumulate_dtype": accumulate_dtype_name(accumulate_dtype),
        "format_version": FORMAT_VERSION,
    }
    if stat != GRAMS or params:  # the Gram payload is left as it was: old Gram caches stay hits
        payload["stat"] = stat
        payload["params"] = params or {}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def stats_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "stats" / f"{key}.safetensors"


# ---------------------------------------------------------------- per-(layer, name) tables


def tensor_name(layer: int, input: str) -> str:
    return f"L{layer}.{input}"


_TENSOR_NAME = re.compile(r"L(\d+)\.(.+)")


def entry_tensors(entries: dict[tuple[int, str], torch.Tensor], prefix: str = "") -> Tensors:
    """(layer, name) -> tensor as ``{prefix}L{layer}.{name}`` -> tensor, in sorted entry order.

    The prefix lets one file hold several tables (ASVD's abs_mean and abs_max).
    """
    return {
        prefix + tensor_name(i, name): entries[(i, name)].contiguous()
        for i, name in sorted(entries)
    }


def tensor_entries(tensors: Tensors, prefix: str = "") -> dict[tuple[int, str], torch.Tensor]:
    """Inverse of ``entry_tensors`` for the tensors whose name starts with ``prefix``.

    Raises:
        StatsCacheError: a selected name is not ``{prefix}L{layer}.{name}``.
    """
    entries: dict[tuple[int, str], torch.Tensor] = {}
    for full, tensor in tensors.items():
        if not full.startswith(prefix):
            continue
        match = _TENSOR_NAME.fullmatch(full.removeprefix(prefix))
        if match is None:
            raise StatsCacheError(f"tensor name {full!r} is not {prefix}L<layer>.<name>")
        entries[(int(match.group(1)), match.group(2))] = tensor
    return entries


# ---------------------------------------------------------------- the one file format


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of ``tensor``, whatever its dtype (bfloat16 has no numpy type)."""
    return tensor.contiguous().view(-1).view(torch.uint8).numpy()


def _digest(tensors: Tensors) -> str:
    """sha256 over name, dtype, shape and bytes of each tensor in order.

    Covers the header as well as the bytes, so a flipped dtype or shape is caught too, and bytes
    that still parse as finite numbers.
    """
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _write_atomic(path: Path, tensors: Tensors, metadata: dict[str, str]) -> None:
    """Readers see the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp's 0600 would lock other users out of a shared cache
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_entry(
    path: Path,
    key: str,
    stat: str,
    tensors: Tensors,
    fields: Fields,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write statistic ``stat``'s named tensors and JSON scalars under ``key``, atomically.

    Args:
        tensors: name -> tensor of any shape; the order is kept and checksummed.
        fields: JSON-able scalars of the statistic (e.g. token and batch counts).
        meta: JSON-able provenance (not checked on reading).
    """
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    metadata = {
        "format": "pt",
        "key": key,
        "format_version": str(FORMAT_VERSION),
        "stat": stat,
        "tensors": json.dumps(list(tensors)),
        "fields": json.dumps(fields, sort_keys=True),
        "sha256": _digest(tensors),
        "meta": json.dumps(meta or {}, sort_keys=True, default=str),
    }
    _write_atomic(path, tensors, metadata)


def _read_metadata(path: Path, key: str, stat: str) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("key") != key:
        raise StatsCacheError(f"metadata key {metadata.get('key')!r} is not {key!r}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise StatsCacheError(
            f"format version {metadata.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    if metadata.get("stat", GRAMS) != stat:
        raise StatsCacheError(f"the file holds stat {metadata.get('stat')!r}, not {stat!r}")
    return metadata


def _load_tensors(path: Path, names: list[str]) -> Tensors:
    tensors: Tensors = {}
    with safe_open(str(path), framework="pt") as f:
        present = set(f.keys())
        for name in names:
            if name not in present:
                raise StatsCacheError(f"tensor {name} is missing")
            tensors[name] = f.get_tensor(name).clone()  # own memory, not the file's map
    return tensors


def _check_finite(tensors: Tensors) -> None:
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise StatsCacheError(f"tensor {name} has non-finite values")


def read_entry(path: Path, key: str, stat: str) -> tuple[Tensors, Fields]:
    """Load and verify one cache file: (tensors in stored order, fields).

    Raises:
        StatsCacheError: the file does not parse, belongs to another key, format or statistic,
            lacks a listed tensor, holds a non-finite one, or does not match the checksum.
    """
    try:
        metadata = _read_metadata(path, key, stat)
        if "tensors" not in metadata and stat == GRAMS:
            return _read_legacy_grams(path, metadata)
        tensors = _load_tensors(path, [str(n) for n in json.loads(metadata["tensors"])])
        fields = json.loads(metadata["fields"])
    except StatsCacheError:
        raise
    except Exception as exc:  # any parse failure of a damaged file is a cache miss, not a crash
        raise StatsCacheError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    _check_finite(tensors)
    if _digest(tensors) != metadata.get("sha256"):
        raise StatsCacheError("tensor bytes do not match the stored sha256")
    return tensors, fields


def _read_legacy_grams(path: Path, metadata: dict[str, str]) -> tuple[Tensors, Fields]:
    """A Gram file of the earlier layout: an entry list and a sha256 of the bytes alone."""
    entries = [(int(i), str(name)) for i, name in json.loads(metadata["entries"])]
    tensors = _load_tensors(path, [tensor_name(i, name) for i, name in entries])
    _check_finite(tensors)
    digest = hashlib.sha256()
    for tensor in tensors.values():
        digest.update(_tensor_bytes(tensor))
    if digest.hexdigest() != metadata.get("sha256"):
        raise StatsCacheError("tensor bytes do not match the stored sha256")
    return tensors, {"tokens": int(metadata["tokens"]), "dtype": metadata["dtype"]}


# ---------------------------------------------------------------- hit, miss, store


def lookup(
    cache_dir: Path, key: str, stat: str, decode: Callable[[Tensors, Fields], T]
) -> T | None:
    """The cached statistic, or None on a miss; an unusable file is a miss with a warning.

    ``decode`` turns the verified tensors and fields into the statistic; any exception it raises
    (a wrong shape or dtype) makes the file a miss too, so it is where a statistic checks what the
    generic reader cannot.
    """
    path = stats_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        tensors, fields = read_entry(path, key, stat)
        try:
            value = decode(tensors, fields)
        except StatsCacheError:
            raise
        except Exception as exc:
            raise StatsCacheError(f"invalid {stat} ({type(exc).__name__}: {exc})") from exc
    except StatsCacheError as exc:
        log.warning("Calibration statistics cache %s is unusable (%s); recomputing.", path, exc)
        return None
    log.info("Reusing calibration statistics from %s.", path)
    return value


def store(
    cache_dir: Path,
    key: str,
    stat: str,
    tensors: Tensors,
    fields: Fields,
    meta: dict[str, Any] | None = None,
) -> bool:
    """Cache unless non-finite (never worth reusing); a failed write costs a recomputation later.

    Returns:
        whether the file was written.
    """
    path = stats_path(cache_dir, key)
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if bad:
        log.warning("Not caching calibration statistics: non-finite values in %s.", bad)
        return False
    try:
        write_entry(path, key, stat, tensors, fields, meta)
    except OSError as exc:
        log.warning("Could not write the calibration statistics cache %s (%s).", path, exc)
        return False
    log.info("Cached calibration statistics in %s.", path)
    return True


def load_or_collect_entry(
    cache_dir: Path,
    key: str,
    stat: str,
    collect: Callable[[], T],
    encode: Callable[[T], tuple[Tensors, Fields]],
    decode: Callable[[Tensors, Fields], T],
    meta: dict[str, Any] | None = None,
) -> tuple[T, bool]:
    """(statistic, True) from the cache, else (``collect()``'s, False), written to the cache."""
    value = lookup(cache_dir, key, stat, decode)
    if value is not None:
        return value, True
    value = collect()
    store(cache_dir, key, stat, *encode(value), meta)
    return value, False
