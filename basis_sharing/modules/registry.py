"""Compressed module types by the ``"type"`` string of their ``compression.json`` entries.

Loading looks an entry's type up here, so a new module type is saved and loaded once it is
registered: ``@register_module_type`` on a ``CompressedLinear`` subclass.
"""

from __future__ import annotations

from basis_sharing.errors import ConfigError, unknown_choice
from basis_sharing.modules.base import CompressedLinear

MODULE_TYPES: dict[str, type[CompressedLinear]] = {}


def register_module_type(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    """Class decorator: make ``cls`` the type of layout entries whose type is its layout_type."""
    name = getattr(cls, "layout_type", None)
    if not isinstance(cls, type) or not issubclass(cls, CompressedLinear):
        raise ConfigError(f"register_module_type needs a CompressedLinear subclass, got {cls!r}.")
    if not (isinstance(name, str) and name):
        raise ConfigError(f"{cls.__name__} needs a non-empty layout_type string to be registered.")
    if MODULE_TYPES.get(name, cls) is not cls:
        raise ConfigError(
            f"Module type '{name}' is already registered by {MODULE_TYPES[name].__name__}; "
            f"choose another layout_type for {cls.__name__}."
        )
    MODULE_TYPES[name] = cls
    return cls


def module_type(name: str) -> type[CompressedLinear]:
    """The registered type of layout entries of type ``name``."""
    if name not in MODULE_TYPES:
        raise unknown_choice("compressed module type", str(name), list(MODULE_TYPES))
    return MODULE_TYPES[name]
