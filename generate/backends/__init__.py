"""Backend registry: name -> factory, as timm's ``create_model``.

A backend renders sample ``index`` of a dataset from ``(seed, index)`` alone::

    backend = create_backend("procedural", cfg)   # cfg: GenerateConfig
    backend.class_names                             # ["good", "crack", ...]; index 0 is defect-free
    sample = backend.render(index)                  # generate.schema.Sample (cls follows the mask)

Every backend has all the members of :class:`Backend` (the writer and ``generate`` call them, never probe for
them); :class:`BaseBackend` gives the defaults of a CPU backend that renders one sample at a time. The defects a
backend draws come from :mod:`generate.defects` (``defects.*``), shared by every backend.

Built-in backends are referenced lazily ("module:factory") so heavy optional dependencies of one
backend are imported only when it is used. Third-party code may call :func:`register_backend`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from synthvit.config import ConfigError

if TYPE_CHECKING:
    from generate.schema import Sample


@runtime_checkable
class Backend(Protocol):
    """What ``generate`` asks of a backend."""

    name: str  # the registry name, recorded in each sample's json
    class_names: list[str]  # ids 0..K of the masks; 0 is defect-free
    batch_size: int  # samples per render_batch call (1: one at a time)
    in_process: bool  # True: render in the main process only (one model per GPU), never in worker processes

    def render(self, index: int) -> Sample:
        """Sample ``index``, from ``(seed, index)`` alone."""

    def render_batch(self, indices: list[int]) -> list[Sample]:
        """The samples of ``indices`` (at most ``batch_size``), in order."""

    def validate(self) -> None:
        """Read the backend's inputs whole (e.g. every background decodes); run once before any shard."""

    @property
    def info(self) -> dict:
        """What ``_info.json`` records beside the config (e.g. the backgrounds used); ``{}`` for none."""


BACKEND_MEMBERS = ("name", "class_names", "batch_size", "in_process", "render", "render_batch", "validate", "info")


class BaseBackend:
    """The defaults of :class:`Backend`: one sample at a time, worker processes allowed, no inputs, no info."""

    name: str
    class_names: list[str]
    batch_size: int = 1
    in_process: bool = False

    def render(self, index: int) -> Sample:
        raise NotImplementedError

    def render_batch(self, indices: list[int]) -> list[Sample]:
        return [self.render(i) for i in indices]

    def validate(self) -> None:
        return None

    @property
    def info(self) -> dict:
        return {}


_REGISTRY: dict[str, str | Callable[..., Backend]] = {
    "procedural": "generate.backends.procedural:ProceduralBackend",
    "stylegan": "generate.backends.stylegan:StyleGANBackend",
    "diffusion": "generate.backends.diffusion:DiffusionBackend",
    "contours": "generate.backends.contours:ContoursBackend",
    "copypaste": "generate.backends.copypaste:CopyPasteBackend",
}


def register_backend(name: str, factory: str | Callable[..., Backend]) -> None:
    """Register ``factory(cfg) -> Backend`` (or a lazy "module:attr" reference) under ``name``."""
    _REGISTRY[name] = factory


def list_backends() -> list[str]:
    return sorted(_REGISTRY)


def backend_factory(name: str) -> Callable[..., Backend]:
    """The factory registered under ``name`` (a lazy reference is imported now)."""
    if name not in _REGISTRY:
        raise ConfigError(f"backend: unknown backend {name!r}; available: {', '.join(list_backends())}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory


def create_backend(name: str, cfg: Any) -> Backend:
    """Backend ``name`` for ``cfg`` (a GenerateConfig); refused when it lacks a member of :class:`Backend`."""
    backend = backend_factory(name)(cfg)
    missing = [m for m in BACKEND_MEMBERS if not hasattr(backend, m)]
    if missing:
        raise ConfigError(f"backend: {name!r} lacks {', '.join(missing)} of generate.backends.Backend; subclass "
                          f"generate.backends.BaseBackend for the defaults")
    return backend
