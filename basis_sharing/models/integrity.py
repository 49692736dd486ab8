"""Checksums over every file of a saved compressed model and over its manifest's own sections.

A saved model is read back by three parties that each trust different files: ``load_compressed``
reads the weights and the layout, transformers reads ``config.json`` (a changed ``rope_theta``
loads silently and changes every logit) and the tokenizer files, and the pipeline copies the
manifest's ``info`` into the run record (an edited method or target ratio mislabels the result).
So ``compression.json`` lists the sha256 and size of every other file in the directory, and a
sha256 of each of its own top-level sections (``sections_sha256``).

These checksums detect accidental edits, corruption and incomplete copies, not a deliberate forger
(who could recompute them): the manifest is not signed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from basis_sharing.errors import UserError
from basis_sharing.hashing import file_sha256

log = logging.getLogger(__name__)

MANIFEST = "compression.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
FILES_KEY = "files"
SECTIONS_KEY = "sections_sha256"
# Files every saved model has; the tokenizer and generation config are optional.
REQUIRED_FILES = (WEIGHTS, CONFIG)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CompressedModelError(UserError):
    """A compressed-model directory cannot be written or read back as it is."""


def redo(what: str = "the original file") -> str:
    """What to do about a damaged saved model."""
    return f"Restore {what} from a complete copy, or save the model again (save_model=true)."


# --------------------------------------------------------------------------------------------
# Writing


def file_checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in ``directory`` except the manifest (written after them)."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.iterdir()):
        if path.name == MANIFEST:
            continue
        if not path.is_file():
            # Only plain files are listed and verified; anything else would escape the checks.
            raise CompressedModelError(
                f"Cannot checksum {path}: a saved model holds plain files only."
            )
        entries[path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return entries


def seal(manifest: dict[str, Any]) -> None:
    """Record a sha256 of each top-level section of ``manifest`` (a JSON round-tripped dict)."""
    manifest.pop(SECTIONS_KEY, None)
    manifest[SECTIONS_KEY] = {key: section_digest(manifest[key]) for key in sorted(manifest)}


def section_digest(value: Any) -> str:
    """sha256 of a section's canonical JSON (sorted keys, no spaces), so formatting is free."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Reading


def check_sections(file: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose sections differ from the digests recorded when it was saved."""
    recorded = manifest[SECTIONS_KEY]
    if not (
        isinstance(recorded, dict)
        and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in recorded.values())
    ):
        raise CompressedModelError(
            f"{file}: '{SECTIONS_KEY}' must map each section to a 64-digit hex sha256. "
            + redo(f"the original {MANIFEST}")
        )
    changed = [k for k in recorded if k in manifest and section_digest(manifest[k]) != recorded[k]]
    removed = [k for k in recorded if k not in manifest]
    added = [k for k in manifest if k not in recorded and k != SECTIONS_KEY]
    found = []
    if changed:
        found.append(f"section(s) {changed} changed")
    if removed:
        found.append(f"section(s) {removed} were removed")
    if added:
        found.append(f"section(s) {added} were added")
    if found:
        raise CompressedModelError(
            f"{file} was edited after saving: {'; '.join(found)} (they no longer match "
            f"'{SECTIONS_KEY}'). An edited layout would load the weights into the wrong modules "
            "and an edited info would mislabel the run record (method, target ratio). "
            + redo(f"the original {MANIFEST}")
        )


def check_files(path: Path, manifest: dict[str, Any], *, hash_weights: bool) -> None:
    """Every listed file present with its saved sha256 (the weights: their size, unless asked).

    Files in the directory that the manifest does not list are refused too: transformers reads
    whatever tokenizer or config file it finds, so an added file would change the model unseen.
    """
    files = manifest[FILES_KEY]
    problems = listing_problems(files)
    if problems:
        raise CompressedModelError(
            f"{path / MANIFEST} has a malformed '{FILES_KEY}' list:\n  " + "\n  ".join(problems)
        )
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise CompressedModelError(
            f"{path} is incomplete: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (saved with the model and listed "
            f"in {MANIFEST}). {redo('the missing files')}"
        )
    unlisted = sorted(
        p.name
        for p in path.iterdir()
        if p.name not in files and p.name != MANIFEST and not p.name.startswith(".")
    )
    if unlisted:
        raise CompressedModelError(
            f"{path} holds {unlisted}, which {'was' if len(unlisted) == 1 else 'were'} not saved "
            f"with the model ({MANIFEST} does not list {'it' if len(unlisted) == 1 else 'them'}) "
            "and transformers could read while loading. Move them out of the directory."
        )
    for name, entry in files.items():
        file = path / name
        if name != WEIGHTS or hash_weights:
            check_file_sha256(file, entry["sha256"])
            continue
        # Not hashed here: its size at least catches a truncated or partial copy early.
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CompressedModelError(
                f"{file} has {size} bytes but had {entry['bytes']} when it was saved (see "
                f"{MANIFEST}): it is truncated, corrupted or was changed. {redo()}"
            )


def check_file_sha256(file: Path, expected: str) -> None:
    actual = file_sha256(file)
    if actual != expected:
        raise CompressedModelError(
            f"{file} does not match the checksum in {file.parent / MANIFEST} (sha256 {expected}, "
            f"the file has {actual}): it is corrupted or was changed after saving. {redo()}"
        )


def listing_problems(files: Any) -> list[str]:
    """What is wrong with a manifest's file list (empty when well formed)."""
    if not isinstance(files, dict):
        return [f"'{FILES_KEY}' must be an object, not {type(files).__name__}"]
    problems = [f"{name} is not listed" for name in REQUIRED_FILES if name not in files]
    for name, entry in files.items():
        # A name is a plain file in the directory: a path could point anywhere.
        if name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            problems.append(f"{name!r} is not a file name of a saved model")
        elif not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry["bytes"], bool)
            and entry["bytes"] >= 0
        ):
            problems.append(f"{name}: needs a 64-digit hex 'sha256' and a 'bytes' count >= 0")
    return problems[:20]


def check_version_1(path: Path) -> None:
    """A format-1 save checksums only its weights: load it, but say what is not verified."""
    if (path / TOKENIZER_CONFIG).is_file() and not (path / "tokenizer.json").is_file():
        # Format 1 lists no files, but its writer always saved a fast tokenizer with its config.
        raise CompressedModelError(
            f"{path} is incomplete: tokenizer.json is missing (its {TOKENIZER_CONFIG} is there). "
            + redo("tokenizer.json")
        )
    log.warning(
        "%s was saved in format version 1, which checksums only %s: %s, generation_config.json, "
        "the tokenizer files and the manifest's info and layout are not verified. Save the model "
        "again (load_compressed, then save_compressed) to have every file checked.",
        path / MANIFEST,
        WEIGHTS,
        CONFIG,
    )


def has_tokenizer(path: Path, manifest: dict[str, Any]) -> bool:
    """Whether the saved model has a tokenizer (every transformers tokenizer saves its config)."""
    if FILES_KEY in manifest:
        return TOKENIZER_CONFIG in manifest[FILES_KEY]
    return (path / TOKENIZER_CONFIG).is_file()
