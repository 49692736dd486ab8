"""On-disk cache of calibration statistics, so a sweep computes them once (DESIGN.md principle 5).

A ratio or group-size sweep, or a second method, needs the same Grams: they depend only on the
model, the calibration tokens and the accumulation dtype, which ``stats_key`` hashes. An entry is
one safetensors file ``<cache_dir>/stats/<key>.safetensors`` (tensors ``L{layer}.{input}``) whose
metadata repeats the key, the format version, the token count, the dtype, the entry list, a sha256
of the tensor bytes and the caller's provenance. A file that fails any check is recomputed and
overwritten, with a warning: a corrupted cache must never feed a compression silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from basis_sharing.calibration.grams import GramStats, accumulate_dtype_name

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class StatsCacheError(Exception):
    """A cache file is unusable; the message says why."""


def stats_key(model_identity: dict[str, Any], calibration_hash: str, accumulate_dtype: str) -> str:
    """24 hex chars of sha256 over a canonical JSON of everything the Grams depend on.

    Args:
        model_identity: JSON-able description of the weights (id, revision/commit or GGUF sha256,
            dtype, tokenizer).
        calibration_hash: sha256 of the calibration token ids (pins dataset, split, sampler, seed).
        accumulate_dtype: "float32" or "float64" (a torch dtype is accepted too).
    """
    payload = {
        "model": model_identity,
        "calibration": calibration_hash,
        "accumulate_dtype": accumulate_dtype_name(accumulate_dtype),
        "format_version": FORMAT_VERSION,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def stats_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "stats" / f"{key}.safetensors"


def tensor_name(layer: int, input: str) -> str:
    return f"L{layer}.{input}"


def _digest(stats: GramStats, entries: list[tuple[int, str]]) -> str:
    """sha256 of the Gram bytes in entry order: catches corruption that still parses as finite."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(stats.grams[entry].contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_stats(path: Path, stats: GramStats, key: str, meta: dict[str, Any] | None = None) -> None:
    """Write ``stats`` to ``path`` atomically: readers see the old file or the complete new one."""
    entries = sorted(stats.grams)
    tensors = {tensor_name(i, name): stats.grams[(i, name)].contiguous() for i, name in entries}
    metadata = {
        "format": "pt",
        "key": key,
        "format_version": str(FORMAT_VERSION),
        "tokens": str(stats.tokens),
        "dtype": stats.dtype,
        "entries": json.dumps([[i, name] for i, name in entries]),
        "sha256": _digest(stats, entries),
        "meta": json.dumps(meta or {}, sort_keys=True, default=str),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_metadata(path: Path, key: str) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("key") != key:
        raise StatsCacheError(f"metadata key {metadata.get('key')!r} is not {key!r}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise StatsCacheError(
            f"format version {metadata.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    return metadata


def _load_grams(
    path: Path, entries: list[tuple[int, str]], dtype: str
) -> dict[tuple[int, str], torch.Tensor]:
    grams: dict[tuple[int, str], torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        present = set(f.keys())
        for layer, name in entries:
            tname = tensor_name(layer, name)
            if tname not in present:
                raise StatsCacheError(f"tensor {tname} is missing")
            grams[(layer, name)] = f.get_tensor(tname).clone()  # own memory, not the file's map
    for (layer, name), gram in grams.items():
        tname = tensor_name(layer, name)
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
            raise StatsCacheError(f"tensor {tname} has non-square shape {tuple(gram.shape)}")
        if str(gram.dtype).removeprefix("torch.") != dtype:
            raise StatsCacheError(f"tensor {tname} has dtype {gram.dtype}, metadata says {dtype}")
        if not torch.isfinite(gram).all():
            raise StatsCacheError(f"tensor {tname} has non-finite values")
    return grams


def read_stats(path: Path, key: str) -> GramStats:
    """Load and verify a cache file.

    Raises:
        StatsCacheError: the file does not parse, belongs to another key or format, lacks a listed
            tensor, holds a non-square or non-finite one, or its bytes do not match the checksum.
    """
    try:
        metadata = _read_metadata(path, key)
        entries = [(int(i), str(name)) for i, name in json.loads(metadata["entries"])]
        dtype = accumulate_dtype_name(metadata["dtype"])
        stats = GramStats(
            grams=_load_grams(path, entries, dtype), tokens=int(metadata["tokens"]), dtype=dtype
        )
    except StatsCacheError:
        raise
    except Exception as exc:  # any parse failure of a damaged file is a cache miss, not a crash
        raise StatsCacheError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if _digest(stats, entries) != metadata.get("sha256"):
        raise StatsCacheError("tensor bytes do not match the stored sha256")
    return stats


def load_or_collect(
    cache_dir: Path,
    key: str,
    collect: Callable[[], GramStats],
    meta: dict[str, Any] | None = None,
) -> tuple[GramStats, bool]:
    """The cached statistics for ``key``, or ``collect()``'s, written to the cache.

    Args:
        cache_dir: cache root; the file is ``<cache_dir>/stats/<key>.safetensors``.
        key: from ``stats_key``.
        collect: computes the statistics on a miss (e.g. a closure over ``collect_grams``).
        meta: JSON-able provenance stored beside the tensors (not part of the key).

    Returns:
        (statistics, True on a cache hit).
    """
    path = stats_path(cache_dir, key)
    if path.exists():
        try:
            stats = read_stats(path, key)
        except StatsCacheError as exc:
            log.warning("Calibration statistics cache %s is unusable (%s); recomputing.", path, exc)
        else:
            log.info("Reusing calibration statistics from %s.", path)
            return stats, True
    stats = collect()
    _store(path, stats, key, meta)
    return stats, False


def _store(path: Path, stats: GramStats, key: str, meta: dict[str, Any] | None) -> None:
    """Cache ``stats`` unless they are non-finite; a failed write costs a recomputation later."""
    bad = [tensor_name(*entry) for entry, g in stats.grams.items() if not torch.isfinite(g).all()]
    if bad:
        log.warning("Not caching calibration statistics: non-finite values in %s.", bad)
        return
    try:
        save_stats(path, stats, key, meta)
    except OSError as exc:
        log.warning("Could not write the calibration statistics cache %s (%s).", path, exc)
        return
    log.info("Cached calibration statistics in %s.", path)
