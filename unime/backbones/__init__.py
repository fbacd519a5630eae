"""The backbone registry: one `BackboneSpec` per model family (DESIGN.md, contract 3).

Nothing outside this package branches on the backbone; code asks the registry instead:
`get_backbone("qwen2_vl")`, `backbone_for_model_type(config.model_type)`, `list_backbones()`.
To add a family, write its `BackboneSpec` (with a tiny builder) and `register` it below.
"""

from __future__ import annotations

from unime.backbones.spec import BackboneSpec, TurnFormat
from unime.errors import UnimeError

_REGISTRY: dict[str, BackboneSpec] = {}


class UnknownBackboneError(UnimeError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; registered backbones: {', '.join(list_backbones())}"
        ) from None


def backbone_for_model_type(model_type: str) -> BackboneSpec:
    """The registry entry serving a Hugging Face `config.model_type`."""
    for spec in _REGISTRY.values():
        if model_type in spec.model_types:
            return spec
    known = sorted(t for spec in _REGISTRY.values() for t in spec.model_types)
    raise UnknownBackboneError(
        f"no registered backbone serves model_type {model_type!r}; supported model types: {', '.join(known)}"
    )


# Modules of this package that define built-in families; each exports `SPECS`, a tuple of BackboneSpec.
_BUILTIN_MODULES = ("qwen2_vl", "qwen3_vl", "llava", "idefics3")


def _register_builtin() -> None:
    import importlib

    for module_name in _BUILTIN_MODULES:
        for spec in importlib.import_module(f"unime.backbones.{module_name}").SPECS:
            register(spec)


_register_builtin()

__all__ = [
    "BackboneSpec",
    "TurnFormat",
    "UnknownBackboneError",
    "backbone_for_model_type",
    "get_backbone",
    "list_backbones",
    "register",
]
