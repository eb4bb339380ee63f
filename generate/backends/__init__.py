"""Backend registry: name -> factory, as timm's ``create_model``.

A backend renders sample ``index`` of a dataset from ``(seed, index)`` alone::

    backend = create_backend("procedural", cfg)   # cfg: GenerateConfig
    backend.class_names                             # ["good", "crack", ...]; index 0 is defect-free
    sample = backend.render(index)                  # generate.schema.Sample (cls follows the mask)

Built-in backends are referenced lazily ("module:factory") so heavy optional dependencies of one
backend are imported only when it is used. Third-party code may call :func:`register_backend`.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

from synthvit.config import ConfigError


class Backend(Protocol):
    class_names: list[str]

    def render(self, index: int) -> Any: ...


_REGISTRY: dict[str, str | Callable[..., Backend]] = {
    "procedural": "generate.backends.procedural:ProceduralBackend",
    "stylegan": "generate.backends.stylegan:StyleGANBackend",
    "diffusion": "generate.backends.diffusion:DiffusionBackend",
    "contours": "generate.backends.contours:ContoursBackend",
}


def register_backend(name: str, factory: str | Callable[..., Backend]) -> None:
    """Register ``factory(cfg) -> Backend`` (or a lazy "module:attr" reference) under ``name``."""
    _REGISTRY[name] = factory


def list_backends() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, cfg: Any) -> Backend:
    if name not in _REGISTRY:
        raise ConfigError(f"backend: unknown backend {name!r}; available: {', '.join(list_backends())}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(cfg)
