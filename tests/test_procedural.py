import numpy as np
import pytest

from generate import defects
from generate.backends import create_backend, list_backends, register_backend
from generate.backends.procedural import ProceduralBackend
from generate.config import DEFECTS, SURFACES, GenerateConfig
from generate.defects import feature_scale
from generate.schema import encode_sample, main_class
from synthvit.config import ConfigError, load_config


def backend(**overrides) -> ProceduralBackend:
    cfg = load_config(GenerateConfig, overrides=[f"{k}={v}" for k, v in overrides.items()])
    return create_backend("procedural", cfg)


def test_same_seed_and_index_give_the_same_bytes():
    a, b = backend(image_size=64), backend(image_size=64, num_samples=7, samples_per_shard=3)
    for i in (0, 5, 123):
        ea, eb = encode_sample(i, a.render(i)), encode_sample(i, b.render(i))
        assert ea == eb
    assert encode_sample(5, a.render(5)) != encode_sample(6, a.render(6))
    assert encode_sample(5, a.render(5)) != encode_sample(5, backend(image_size=64, seed=1).render(5))


def test_labels_follow_the_mask():
    b = backend(image_size=64, **{"defects.defect_free_prob": 0.3})
    seen_free = seen_defect = 0
    for i in range(60):
        s = b.render(i)
        assert s.mask.shape == s.image.shape[:2] and s.mask.dtype == np.uint8
        assert s.mask.max() < len(b.class_names)
        assert s.cls == main_class(s.mask, len(b.class_names))
        if s.cls == 0:
            seen_free += 1
            assert not s.mask.any() and s.meta["defects"] == []
        else:
            seen_defect += 1
            # per-instance areas add up to the mask's pixels of each class; boxes contain their pixels
            for k in range(1, len(b.class_names)):
                assert sum(d["area"] for d in s.meta["defects"] if d["class"] == k) == int((s.mask == k).sum())
            for d in s.meta["defects"]:
                x0, y0, x1, y1 = d["bbox"]
                assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
                assert (s.mask[y0:y1, x0:x1] == d["class"]).any()
                assert d["name"] == b.class_names[d["class"]]
    assert seen_free > 5 and seen_defect > 30


def test_mask_is_exactly_the_changed_pixels(monkeypatch):
    """Rendering the same samples with compositing disabled changes exactly the masked pixels."""
    kw = {"image_size": 96, "defects.defect_free_prob": 0.0, "procedural.camera.jpeg_artifact_prob": 0.0}
    with_defects = [backend(**kw).render(i) for i in range(30)]
    real = defects.composite

    def dry_run(img, inst, mask, stamp, inst_id, class_id, light=None, adjust=None):
        return real(img.copy(), inst.copy(), mask.copy(), stamp, inst_id, class_id, light, adjust)

    monkeypatch.setattr("generate.defects.composite", dry_run)
    without = [backend(**kw).render(i) for i in range(30)]
    for a, b in zip(with_defects, without):
        changed = a.image != b.image
        if changed.ndim == 3:
            changed = changed.any(-1)
        assert not (changed & (a.mask == 0)).any(), "a pixel outside the mask changed"
        if a.mask.any():
            assert changed[a.mask > 0].mean() > 0.5


def test_every_surface_class_and_colour_mode_appears():
    b = backend(image_size=48, **{"defects.max_defects": 3})
    surfaces, classes, channels = set(), set(), set()
    for i in range(150):
        s = b.render(i)
        surfaces.add(s.meta["surface"]["family"])
        classes.update(d["name"] for d in s.meta["defects"])
        channels.add(s.meta["channels"])
        assert s.image.ndim == (2 if s.meta["channels"] == 1 else 3)
    assert surfaces == set(SURFACES)
    assert classes == set(DEFECTS)
    assert channels == {1, 3}


def test_class_subset_renumbers_ids():
    b = backend(image_size=48, **{"defects.classes": "[pit,chip]", "defects.defect_free_prob": 0.0})
    assert b.class_names == ["good", "pit", "chip"]
    ids = set()
    for i in range(30):
        ids.update(np.unique(b.render(i).mask).tolist())
    assert ids <= {0, 1, 2} and {1, 2} <= ids


@pytest.mark.parametrize("size", ["32", "33x47", "200x64", "3840x2160"])
def test_sizes(size):
    b = backend(image_size=size)
    w, h = GenerateConfig(image_size=size).size
    for i in range(2 if size == "3840x2160" else 20):
        s = b.render(i)
        assert s.image.shape[:2] == (h, w) and s.mask.shape == (h, w)


def test_defects_are_small_in_4k():
    """Defect scale grows sublinearly: a 4K frame's defects cover a smaller share than a 256 px frame's."""
    assert feature_scale(256, 256, 0.5) == 256
    assert feature_scale(64, 64, 0.5) == 64
    assert feature_scale(3840, 2160, 0.5) / 2160 < 0.4 * feature_scale(256, 256, 0.5) / 256
    def share(size):
        b = backend(image_size=size, **{"defects.defect_free_prob": 0.0})
        fr = [(s.mask > 0).mean() for s in (b.render(i) for i in range(4))]
        return float(np.mean(fr))
    assert share("3840x2160") < share(256) / 3


def test_registry(monkeypatch):
    import generate.backends as registry

    assert "procedural" in list_backends()
    with pytest.raises(ConfigError, match="unknown backend"):
        create_backend("nope", GenerateConfig())
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_backend("procedural-alias", ProceduralBackend)
    assert isinstance(create_backend("procedural-alias", GenerateConfig(image_size=32)), ProceduralBackend)
