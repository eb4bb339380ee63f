"""The Backend protocol: every registered backend has every member the writer and ``generate`` call, typed as the
protocol says (no caller probes for a member)."""
import inspect
from typing import get_type_hints

import pytest

import generate.backends as registry
from generate.backends import BACKEND_MEMBERS, Backend, BaseBackend, backend_factory, create_backend, list_backends
from generate.config import GenerateConfig
from generate.schema import Sample
from synthvit.config import ConfigError, load_config

METHODS = ("render", "render_batch", "validate")
NAMES = {"Sample": Sample}


def hints(fn) -> dict:
    return get_type_hints(fn, localns=NAMES)


def test_members_list_is_the_protocol():
    declared = set(Backend.__annotations__) | {n for n in vars(Backend) if not n.startswith("_")}
    assert declared == set(BACKEND_MEMBERS)


@pytest.mark.parametrize("name", list_backends())
def test_every_backend_class_has_every_member_typed(name):
    cls = backend_factory(name)
    assert cls.name == name
    assert get_type_hints(cls)["class_names"] == list[str]
    assert isinstance(cls.batch_size, int) and isinstance(cls.in_process, bool)
    for method in METHODS:
        ours, theirs = getattr(Backend, method), getattr(cls, method)
        assert list(inspect.signature(theirs).parameters) == list(inspect.signature(ours).parameters), method
        assert hints(theirs) == hints(ours), method
    info = inspect.getattr_static(cls, "info")
    assert isinstance(info, property) and hints(info.fget) == hints(Backend.info.fget)


@pytest.mark.parametrize("name, overrides", [
    ("procedural", []), ("contours", []),
    ("stylegan", ["stylegan.channel_max=8", "stylegan.batch_size=2", "stylegan.device=cpu"]),
])
def test_backend_instances_satisfy_the_protocol(name, overrides):
    cfg = load_config(GenerateConfig, overrides=[f"backend={name}", "image_size=32", *overrides])
    backend = create_backend(name, cfg)
    assert isinstance(backend, Backend) and isinstance(backend, BaseBackend)
    assert backend.batch_size >= 1 and backend.info == {}
    assert backend.validate() is None
    batch = backend.render_batch([0, 1])
    assert len(batch) == 2 and all(isinstance(s, Sample) for s in batch)
    assert all(s.mask.max() < len(backend.class_names) for s in batch)


def test_a_backend_missing_members_is_refused(monkeypatch):
    class RenderOnly:
        class_names = ("good",)

        def __init__(self, cfg):
            pass

        def render(self, index):
            raise AssertionError("never called")

    class Complete(BaseBackend):
        name, class_names = "complete", ("good",)

        def __init__(self, cfg):
            pass

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_backend("render-only", RenderOnly)
    registry.register_backend("complete", Complete)
    with pytest.raises(ConfigError, match="'render-only' lacks name, batch_size, in_process, render_batch, validate, "
                                          "info of generate.backends.Backend; subclass generate.backends.BaseBackend"):
        create_backend("render-only", GenerateConfig())
    backend = create_backend("complete", GenerateConfig())
    assert (backend.batch_size, backend.in_process, backend.info, backend.validate()) == (1, False, {}, None)
