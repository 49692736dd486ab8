"""Save and load compressed models as safetensors plus a JSON manifest (never a pickle).

The reference code saves a torch pickle because safetensors rejects the duplicate keys of its
shared bases (docs/methods.md §3.8). Here every shared basis is registered once in
``model.shared_bases``, so ``safetensors.torch.save_model`` stores each tensor once. What the
state dict cannot say (which projections were replaced, by which module, with which rank and
basis) goes into ``compression.json``; loading rebuilds the module tree from that layout on the
meta device and assigns the saved tensors, so the dense model is never materialised.

A directory holds ``model.safetensors``, ``compression.json``, the base model's ``config.json``,
``generation_config.json`` when the model has one, and the tokenizer files when given. The
manifest lists the sha256 and size of every other file and a sha256 of each of its own sections
(see ``basis_sharing.models.integrity``), and reading it verifies them all.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from basis_sharing.files import publish_modes
from basis_sharing.models import integrity
from basis_sharing.models.families import FAMILIES, FamilyAdapter, get_family
from basis_sharing.models.integrity import MANIFEST, WEIGHTS, CompressedModelError
from basis_sharing.models.loading import torch_dtype
from basis_sharing.modules import MODULE_TYPES, SHARED_BASES, LayoutError, is_compressed
from basis_sharing.provenance import package_versions

log = logging.getLogger(__name__)

# Format 2 checksums every file and the manifest's sections; format 1 only the weights.
FORMAT_VERSION = 2
REQUIRED_KEYS = {
    1: ("format_version", "family", "layout", "weights_sha256"),
    2: ("format_version", "family", "layout", "info", integrity.FILES_KEY, integrity.SECTIONS_KEY),
}
# Every entry says where it goes and which module type rebuilds it; the type owns the other keys.
ENTRY_KEYS = ("layer", "kind", "type")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_PACKAGES = ("torch", "transformers", "safetensors", "basis-sharing")


@dataclass
class LoadedCompressed:
    """What ``load_compressed`` returns: the model ready for evaluation and how it was made."""

    model: nn.Module
    family: FamilyAdapter
    tokenizer: Any | None
    manifest: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Saving


def save_compressed(
    model: nn.Module,
    directory: str | Path,
    *,
    family: FamilyAdapter,
    tokenizer: Any | None = None,
    info: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (compressed in place by a method) so that ``load_compressed`` rebuilds it.

    Everything is written into a temporary sibling directory first and moved into place at the
    end, so an interrupted save never leaves a directory that looks complete, and an overwritten
    save stays whole until the new one replaces it. Files and the directory get the usual
    permissions of the user's umask (0644 / 0755 for umask 022), so a saved model can be shared.

    Args:
        info: what produced the model (method, ratio, groups, base model id and revision...),
            stored verbatim in compression.json; it must be JSON-serialisable.
        overwrite: replace ``directory`` when it is a non-empty compressed-model directory.
    Returns:
        The directory written.
    """
    target = Path(directory).expanduser()
    check_target(target, overwrite)
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "layout": compressed_layout(model, family),
        "info": info or {},
    }
    _check_serialisable(manifest["info"])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _write_files(model, staging, tokenizer, manifest)
        publish_modes(staging)  # mkdtemp and safetensors create 0700 / 0600
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "Saved compressed %s model (%d compressed projections) to %s",
        family.name,
        len(manifest["layout"]),
        target,
    )
    return target


def compressed_layout(model: nn.Module, family: FamilyAdapter) -> list[dict[str, Any]]:
    """One entry per compressed projection, in layer then kind order; dense ones are absent."""
    registry = getattr(model, SHARED_BASES, None)
    layout: list[dict[str, Any]] = []
    for index, layer in enumerate(family.layers(model)):
        for kind in family.kinds:
            module = family.module(layer, kind)
            if is_compressed(module):
                layout.append(_layout_entry(index, kind, module, model))
            elif not _is_dense_projection(module):
                raise CompressedModelError(
                    f"Cannot save layer {index} projection '{kind}': its module "
                    f"{type(module).__name__} is neither a dense projection nor a registered "
                    f"compressed module type ({', '.join(sorted(MODULE_TYPES))}), so it could "
                    "not be rebuilt on loading."
                )
    _check_registry_is_used(registry, layout)
    return layout


def _layout_entry(index: int, kind: str, module: nn.Module, model: nn.Module) -> dict[str, Any]:
    """The module's own entry; its type must be registered, or loading could not rebuild it."""
    name = module.layout_type
    if MODULE_TYPES.get(name) is not type(module):
        raise CompressedModelError(
            f"Cannot save layer {index} projection '{kind}': its module {type(module).__name__} "
            f"(type '{name}') is not the registered compressed module type of that name, so it "
            "could not be rebuilt on loading. Decorate it with "
            "basis_sharing.modules.register_module_type."
        )
    try:
        return module.layout_entry(index, kind, model)
    except LayoutError as err:
        raise CompressedModelError(str(err)) from err


def _is_dense_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | Conv1D)


def _check_registry_is_used(registry: nn.ModuleDict | None, layout: list[dict]) -> None:
    """A basis no layer references would be saved but could not be placed on loading."""
    used = {key for e in layout for key in MODULE_TYPES[e["type"]].registry_shapes(e)}
    unused = sorted(set(registry or {}) - used)
    if unused:
        raise CompressedModelError(
            f"model.{SHARED_BASES} holds bases that no projection uses: {unused}. Remove them "
            "before saving."
        )


def check_target(target: Path, overwrite: bool, how: str = "pass overwrite=True") -> None:
    """Refuse to clobber anything that is not an earlier compressed model we may replace.

    Args:
        how: how the caller's user allows replacing a save (the pipeline names its config key).
    """
    if not target.exists():
        return
    if not target.is_dir():
        raise CompressedModelError(f"Cannot save a compressed model to {target}: not a directory.")
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise CompressedModelError(
            f"Cannot save a compressed model to {target}: the directory is not empty. Choose "
            f"another directory or {how} to replace a compressed model saved there."
        )
    if not (target / MANIFEST).is_file():
        raise CompressedModelError(
            f"Refusing to overwrite {target}: it is not empty and holds no {MANIFEST}, so it is "
            "not a compressed-model directory. Its contents would be deleted; choose another one."
        )


def _check_serialisable(info: Any) -> None:
    try:
        json.dumps(info)
    except (TypeError, ValueError) as err:
        raise CompressedModelError(
            f"save_compressed(info=...) must be JSON-serialisable (plain dicts, lists, strings, "
            f"numbers): {err}. Convert OmegaConf nodes with OmegaConf.to_container."
        ) from err


def _write_files(model: nn.Module, out: Path, tokenizer: Any | None, manifest: dict) -> None:
    from safetensors.torch import save_model

    save_model(model, str(out / WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights saved here are plain tensors
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    manifest[integrity.FILES_KEY] = integrity.file_checksums(out)
    manifest["packages"] = package_versions(_PACKAGES)
    # Seal what will be read back: JSON turns tuples into lists and int keys into strings.
    sealed = json.loads(json.dumps(manifest))
    integrity.seal(sealed)
    (out / MANIFEST).write_text(json.dumps(sealed, indent=2) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging``; the old contents are removed only after the move.

    Over an earlier save the two directories are swapped in one atomic exchange where the OS
    allows it, so ``target`` is always a whole model. Elsewhere the old one is renamed aside
    first and renamed back if the move fails; only a kill between the two renames leaves
    ``target`` absent, with the old model intact in ``.<name>.old-*`` next to it.
    """
    if not target.exists():
        staging.rename(target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging)  # now holds the old save
        return
    old = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # linux/fs.h, fcntl.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2; False where it is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # kernel or file system without the exchange: use the two renames
    raise OSError(code, os.strerror(code), str(a), None, str(b))


# --------------------------------------------------------------------------------------------
# Loading


def load_compressed(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LoadedCompressed:
    """Rebuild a model written by ``save_compressed``, in eval mode, on ``device``.

    The manifest and the checksum of every file are checked before any model is built. The
    skeleton is created on the meta device (buffers such as RoPE's ``inv_freq`` are computed for
    real, they are not saved), the compressed modules are installed from the layout, and the saved
    tensors are assigned in place, so peak memory is about the size of the compressed weights.

    Args:
        dtype: cast floating-point weights to it, a torch dtype or a model.dtype name such as
            "bfloat16" (default: keep the saved dtype). Buffers keep the dtype from_config gives
            them, as with from_pretrained.
    """
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    path = Path(directory).expanduser()
    manifest, family = read_manifest(path)
    verify_weights(path, manifest)
    config = _read_config(path, family)
    model = build_skeleton(config, family, manifest["layout"])
    state = _read_weights(path, device, dtype)
    load_weights(model, state)
    _load_generation_config(model, path)
    model.to(device).eval()
    tokenizer = _load_tokenizer(path)
    log.info("Loaded compressed %s model from %s", family.name, path)
    return LoadedCompressed(model=model, family=family, tokenizer=tokenizer, manifest=manifest)


def read_manifest(path: Path) -> tuple[dict[str, Any], FamilyAdapter]:
    """Parse and validate compression.json and the files it lists; problems name the file.

    Verified here: the manifest's sections against their digests, every listed file present
    and no unlisted one, and the sha256 of every file but the weights: they are the one large
    file, so only their size is checked here and ``verify_weights`` hashes them when the model
    is loaded. A format-1 manifest (weights checksum only) is read with a warning saying what
    is not verified.
    """
    file = path / MANIFEST
    if not file.is_file():
        raise CompressedModelError(
            f"{file} not found: {path} is not a directory written by save_compressed."
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CompressedModelError(f"{file} is not valid JSON: {err}.") from err
    if not isinstance(manifest, dict):
        kind = type(manifest).__name__
        raise CompressedModelError(f"{file} must hold a JSON object, not a {kind}.")
    version = manifest.get("format_version")
    if version is not None and (isinstance(version, bool) or version not in REQUIRED_KEYS):
        raise CompressedModelError(
            f"{file} has format_version {version!r}; this version of basis-sharing reads "
            f"format_version {' or '.join(map(str, REQUIRED_KEYS))}. Load it with the version "
            f"that wrote it (see 'packages' in {MANIFEST})."
        )
    missing = [k for k in REQUIRED_KEYS.get(version, ("format_version",)) if k not in manifest]
    if missing:
        raise CompressedModelError(f"{file} lacks the required key(s) {missing}.")
    if version >= 2:
        integrity.check_sections(file, manifest)
    if manifest["family"] not in FAMILIES:
        raise CompressedModelError(
            f"{file} names the unknown model family {manifest['family']!r}. Valid choices: "
            f"{', '.join(sorted(FAMILIES))}."
        )
    family = get_family(manifest["family"])
    problems = layout_problems(manifest["layout"], family)
    if problems:
        raise CompressedModelError(f"{file} has a malformed layout:\n  " + "\n  ".join(problems))
    if version == 1:
        sha = manifest["weights_sha256"]
        if not (isinstance(sha, str) and len(sha) == 64):
            raise CompressedModelError(f"{file}: weights_sha256 must be a 64-digit hex string.")
        integrity.check_version_1(path)
    else:
        integrity.check_files(path, manifest, hash_weights=False)
    manifest.setdefault("info", {})
    return manifest, family


def require_tokenizer(path: Path, manifest: dict[str, Any]) -> None:
    """Evaluating a saved model tokenizes text with the tokenizer saved next to it."""
    if not integrity.has_tokenizer(path, manifest):
        raise CompressedModelError(
            f"{path} was saved without a tokenizer (no {integrity.TOKENIZER_CONFIG}), so its "
            "evaluation text cannot be tokenized. Save it with one: save_compressed(..., "
            "tokenizer=...), as save_model=true does."
        )


def layout_problems(layout: Any, family: FamilyAdapter) -> list[str]:
    """Everything wrong with a layout (empty when it is well formed), at most 20 lines."""
    if not isinstance(layout, list):
        return [f"'layout' must be a list, not {type(layout).__name__}"]
    problems: list[str] = []
    seen: set[tuple[int, str]] = set()
    bases: dict[str, tuple[int, int]] = {}
    for i, entry in enumerate(layout):
        entry_problems = _entry_problems(entry, family)
        problems += [f"layout[{i}]: {p}" for p in entry_problems]
        if entry_problems:
            continue
        where = (entry["layer"], entry["kind"])
        if where in seen:
            problems.append(f"layout[{i}]: layer {where[0]} kind '{where[1]}' appears twice")
        seen.add(where)
        for key, here in MODULE_TYPES[entry["type"]].registry_shapes(entry).items():
            shape = bases.setdefault(key, here)
            if shape != here:
                problems.append(
                    f"layout[{i}]: basis '{key}' has (d_in, rank) {here} here but {shape} in an "
                    "earlier entry"
                )
    return problems[:20]


def _entry_problems(entry: Any, family: FamilyAdapter) -> list[str]:
    if not isinstance(entry, dict):
        return [f"must be an object, not {type(entry).__name__}"]
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        return [f"lacks the key(s) {missing}"]
    module_type = entry["type"]
    if not (isinstance(module_type, str) and module_type in MODULE_TYPES):
        known = ", ".join(f"'{name}'" for name in sorted(MODULE_TYPES))
        return [f"'type' must be one of {known}, got {module_type!r}"]
    problems = []
    layer = entry["layer"]
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        problems.append(f"'layer' must be an integer >= 0, got {layer!r}")
    if entry["kind"] not in family.kinds:
        problems.append(f"unknown kind {entry['kind']!r} for family {family.name} {family.kinds}")
    return problems + MODULE_TYPES[module_type].entry_problems(entry)


def verify_weights(path: Path, manifest: dict[str, Any]) -> None:
    """The weights must be the bytes that were saved: a flipped byte would load silently."""
    file = path / WEIGHTS
    if not file.is_file():
        raise CompressedModelError(
            f"{file} not found; the compressed model is incomplete. {integrity.redo(WEIGHTS)}"
        )
    if integrity.FILES_KEY in manifest:
        expected = manifest[integrity.FILES_KEY][WEIGHTS]["sha256"]
    else:
        expected = manifest["weights_sha256"]  # format 1
    integrity.check_file_sha256(file, expected)


def _read_config(path: Path, family: FamilyAdapter):
    from transformers import AutoConfig

    file = path / "config.json"
    if not file.is_file():
        raise CompressedModelError(f"{file} not found; the compressed model is incomplete.")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise CompressedModelError(f"{file} cannot be read as a model config: {err}") from err
    if config.model_type not in family.model_types:
        raise CompressedModelError(
            f"{file} describes a '{config.model_type}' model but {path / MANIFEST} names the "
            f"family '{family.name}' ({', '.join(family.model_types)})."
        )
    return config


def build_skeleton(config, family: FamilyAdapter, layout: list[dict[str, Any]]) -> nn.Module:
    """The model with every parameter on the meta device and the layout's modules installed."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    # Tying inside init_empty_weights re-wraps the shared Parameter into a new one, so the tie of
    # from_config is lost there; tie outside it (per the config) so the aliases are known below.
    model.tie_weights()
    layers = family.layers(model)
    for entry in layout:
        if entry["layer"] >= len(layers):
            raise CompressedModelError(
                f"{MANIFEST} lists layer {entry['layer']} but the model in config.json has "
                f"{len(layers)} decoder layers."
            )
        # The entry's type rebuilds it, empty on the meta device; the weights come later.
        module = MODULE_TYPES[entry["type"]].from_layout(entry, model)
        family.set_module(layers[entry["layer"]], entry["kind"], module)
    return model


def _read_weights(
    path: Path, device: str | torch.device, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(path / WEIGHTS, device=str(torch.device(device)))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Assign the saved tensors to the skeleton; names and shapes must match exactly.

    safetensors stores one name per set of aliased parameters (a tied lm_head and embedding), so
    the other names are filled from it and re-tied afterwards to keep one shared Parameter.
    """
    aliases = _alias_groups(model)
    for names in aliases:
        present = [n for n in names if n in state]
        for name in names:
            if present and name not in state:
                state[name] = state[present[0]]
    _check_state_matches(model, state)
    model.load_state_dict(state, strict=False, assign=True)
    for names in aliases:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise CompressedModelError(f"{WEIGHTS} leaves these tensors without a value: {on_meta}")


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one Parameter object (tied weights), two or more per group."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _check_state_matches(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Report missing, unexpected and mis-shaped tensors instead of a torch traceback."""
    expected = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    problems = [
        f"{name}: {WEIGHTS} has shape {tuple(state[name].shape)}, the layout in {MANIFEST} "
        f"expects {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    missing = [n for n in expected if n not in state and n not in buffers]
    unexpected = [n for n in state if n not in expected]
    if missing:
        problems.append(f"missing from {WEIGHTS}: {missing[:10]}")
    if unexpected:
        problems.append(f"in {WEIGHTS} but not in the described model: {unexpected[:10]}")
    if problems:
        raise CompressedModelError(
            f"{WEIGHTS} does not fit the model described by config.json and {MANIFEST} (was "
            "compression.json edited?):\n  " + "\n  ".join(problems[:20])
        )


def _load_generation_config(model: nn.Module, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)


def _load_tokenizer(path: Path):
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
