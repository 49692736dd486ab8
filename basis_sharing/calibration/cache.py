"""On-disk cache of calibration statistics: a sweep computes them once (docs/architecture.md §4.2).

A ratio or group-size sweep, or a second method, needs the same Grams: they depend only on the
model, the calibration tokens and the accumulation dtype, which ``stats_key`` hashes. An entry is
one safetensors file ``<cache_dir>/stats/<key>.safetensors`` (tensors ``L{layer}.{input}``) whose
metadata repeats the key, the format version, the token count, the dtype, the entry list, a sha256
of the tensor bytes and the caller's provenance. A file that fails any check is recomputed and
overwritten, with a warning: a corrupted cache must never feed a compression silently.

Other statistics (ASVD's activation scales, FWSVD's Fisher rows) use the same files, checks and
hit/miss logic through ``load_or_collect_tensors``: the caller converts its dataclass to named
tensors plus JSON scalars and back. Their metadata names the statistic (``stat``) and lists the
tensors; their key hashes the statistic's name and parameters, so no two statistics share a file.
Gram keys and files are exactly what they were before, so existing caches stay valid.
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

from basis_sharing.calibration.grams import GramStats, accumulate_dtype_name
from basis_sharing.files import new_file_mode

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The ``stat`` name of GramStats files (absent from Gram files written before other stats existed).
GRAMS = "grams"

T = TypeVar("T")
Fields = dict[str, Any]  # JSON-able scalars stored beside the tensors (token and batch counts)


class StatsCacheError(Exception):
    """A cache file is unusable; the message says why."""


def stats_key(
    model_identity: dict[str, Any],
    calibration_hash: str,
    accumulate_dtype: str,
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


def tensor_name(layer: int, input: str) -> str:
    return f"L{layer}.{input}"


_TENSOR_NAME = re.compile(r"L(\d+)\.(.+)")


def entry_tensors(
    entries: dict[tuple[int, str], torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """(layer, name) -> tensor as ``{prefix}L{layer}.{name}`` -> tensor, in sorted entry order.

    The prefix lets one file hold several tables (ASVD's abs_mean and abs_max).
    """
    return {
        prefix + tensor_name(i, name): entries[(i, name)].contiguous()
        for i, name in sorted(entries)
    }


def tensor_entries(
    tensors: dict[str, torch.Tensor], prefix: str = ""
) -> dict[tuple[int, str], torch.Tensor]:
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


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of ``tensor``, whatever its dtype (bfloat16 has no numpy type)."""
    return tensor.contiguous().view(-1).view(torch.uint8).numpy()


def _digest(stats: GramStats, entries: list[tuple[int, str]]) -> str:
    """sha256 of the Gram bytes in entry order: catches corruption that still parses as finite."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(_tensor_bytes(stats.grams[entry]))
    return digest.hexdigest()


def _digest_named(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over name, dtype, shape and bytes of each tensor in order.

    Unlike the Gram digest it also covers the header, so a flipped dtype or shape is caught too.
    """
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Readers see the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(
            tmp, new_file_mode()
        )  # mkstemp's 0600 would lock other users out of a shared cache
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        "stat": GRAMS,
    }
    _write_atomic(path, tensors, metadata)


def _read_metadata(path: Path, key: str, stat: str = GRAMS) -> dict[str, str]:
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


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise StatsCacheError(f"tensor {name} has non-finite values")


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
        _check_finite(tname, gram)
    return grams


def read_stats(path: Path, key: str) -> GramStats:
    """Load and verify a cache file.

    Raises:
        StatsCacheError: the file does not parse, belongs to another key, format or statistic,
            lacks a listed tensor, holds a non-square or non-finite one, or its bytes do not match
            the checksum.
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


def _load_or_collect(
    path: Path, read: Callable[[], T], collect: Callable[[], T], store: Callable[[T], None]
) -> tuple[T, bool]:
    """The hit/miss logic every statistic shares: verified hit, or warn, recompute and store."""
    if path.exists():
        try:
            stats = read()
        except StatsCacheError as exc:
            log.warning("Calibration statistics cache %s is unusable (%s); recomputing.", path, exc)
        else:
            log.info("Reusing calibration statistics from %s.", path)
            return stats, True
    stats = collect()
    store(stats)
    return stats, False


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

    def store(stats: GramStats) -> None:
        named = {tensor_name(*entry): gram for entry, gram in stats.grams.items()}
        _store(path, named, lambda: save_stats(path, stats, key, meta))

    return _load_or_collect(path, lambda: read_stats(path, key), collect, store)


def _store(path: Path, named: dict[str, torch.Tensor], save: Callable[[], None]) -> None:
    """Cache unless non-finite (never worth reusing); a failed write costs a recomputation later."""
    bad = [name for name, tensor in named.items() if not torch.isfinite(tensor).all()]
    if bad:
        log.warning("Not caching calibration statistics: non-finite values in %s.", bad)
        return
    try:
        save()
    except OSError as exc:
        log.warning("Could not write the calibration statistics cache %s (%s).", path, exc)
        return
    log.info("Cached calibration statistics in %s.", path)


# ---------------------------------------------------------------- any other statistic


def save_tensors(
    path: Path,
    key: str,
    stat: str,
    tensors: dict[str, torch.Tensor],
    fields: Fields,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write named tensors and JSON scalars as statistic ``stat`` under ``key``, atomically.

    Args:
        tensors: name -> tensor of any shape; the order is kept and checksummed.
        fields: JSON-able scalars of the statistic (e.g. token and batch counts).
        meta: JSON-able provenance (not checked on reading).
    """
    if stat == GRAMS:
        raise ValueError("Grams have their own file layout: use save_stats / load_or_collect.")
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    metadata = {
        "format": "pt",
        "key": key,
        "format_version": str(FORMAT_VERSION),
        "stat": stat,
        "tensors": json.dumps(list(tensors)),
        "fields": json.dumps(fields, sort_keys=True),
        "sha256": _digest_named(tensors),
        "meta": json.dumps(meta or {}, sort_keys=True, default=str),
    }
    _write_atomic(path, tensors, metadata)


def read_tensors(path: Path, key: str, stat: str) -> tuple[dict[str, torch.Tensor], Fields]:
    """Load and verify a file written by ``save_tensors``: (tensors in stored order, fields).

    Raises:
        StatsCacheError: the file does not parse, belongs to another key, format or statistic,
            lacks a listed tensor, holds a non-finite one, or does not match the checksum.
    """
    try:
        metadata = _read_metadata(path, key, stat)
        names = [str(name) for name in json.loads(metadata["tensors"])]
        fields = json.loads(metadata["fields"])
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise StatsCacheError(f"tensor {name} is missing")
                tensors[name] = f.get_tensor(name).clone()  # own memory, not the file's map
    except StatsCacheError:
        raise
    except Exception as exc:  # any parse failure of a damaged file is a cache miss, not a crash
        raise StatsCacheError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    for name, tensor in tensors.items():
        _check_finite(name, tensor)
    if _digest_named(tensors) != metadata.get("sha256"):
        raise StatsCacheError("tensor bytes do not match the stored sha256")
    return tensors, fields


def load_or_collect_tensors(
    cache_dir: Path,
    key: str,
    stat: str,
    collect: Callable[[], T],
    to_tensors: Callable[[T], tuple[dict[str, torch.Tensor], Fields]],
    from_tensors: Callable[[dict[str, torch.Tensor], Fields], T],
    meta: dict[str, Any] | None = None,
) -> tuple[T, bool]:
    """``load_or_collect`` for any statistic that can be written as named tensors plus scalars.

    Args:
        cache_dir: cache root; the file is ``<cache_dir>/stats/<key>.safetensors``.
        key: from ``stats_key(..., stat=stat, params=...)``.
        stat: the statistic's name, stored and checked, so a file of another statistic is a miss.
        collect: computes the statistics on a miss.
        to_tensors: statistics -> (name -> tensor, JSON-able fields).
        from_tensors: the inverse; any exception it raises (e.g. a wrong shape) makes the file a
            miss, so it is where a statistic checks what the generic reader cannot.
        meta: JSON-able provenance stored beside the tensors (not part of the key).

    Returns:
        (statistics, True on a cache hit).
    """
    path = stats_path(cache_dir, key)

    def read() -> T:
        tensors, fields = read_tensors(path, key, stat)
        try:
            return from_tensors(tensors, fields)
        except StatsCacheError:
            raise
        except Exception as exc:
            raise StatsCacheError(f"invalid {stat} ({type(exc).__name__}: {exc})") from exc

    def store(stats: T) -> None:
        tensors, fields = to_tensors(stats)
        _store(path, tensors, lambda: save_tensors(path, key, stat, tensors, fields, meta))

    return _load_or_collect(path, read, collect, store)
