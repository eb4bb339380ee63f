import math

import numpy as np
import pytest

from conftest import assert_cli_error, tiny_overrides
from generate.backends import create_backend, list_backends
from generate.backends.contours import TABLE, ContoursBackend
from generate.config import GenerateConfig
from generate.schema import INFO_FILE, encode_sample, iter_shard, main_class, read_info, verify_dataset
from synthvit.config import ConfigError, load_config


def backend(**overrides) -> ContoursBackend:
    cfg = load_config(GenerateConfig, overrides=["backend=contours", *(f"{k}={v}" for k, v in overrides.items())])
    return create_backend("contours", cfg)


def test_registered_with_class_names():
    assert "contours" in list_backends()
    b = backend(image_size=48, **{"contours.num_classes": 12})
    assert b.class_names[0] == "good" and b.class_names[1] == "contour_01" and len(b.class_names) == 13


def test_same_seed_and_index_give_the_same_bytes():
    a, b = backend(image_size=64), backend(image_size=64, num_samples=7, samples_per_shard=3)
    for i in (0, 5, 123):
        assert encode_sample(i, a.render(i)) == encode_sample(i, b.render(i))
    assert encode_sample(5, a.render(5)) != encode_sample(6, a.render(6))
    assert encode_sample(5, a.render(5)) != encode_sample(5, backend(image_size=64, seed=1).render(5))
    # the class shapes come from the dataset seed: another seed, other shapes
    assert not np.array_equal(a.shapes, backend(image_size=64, seed=1).shapes)


def test_many_instances_and_classes_labels_follow_the_mask():
    b = backend(image_size=96, **{"contours.min_instances": 6, "contours.max_instances": 12})
    classes, grays = set(), set()
    for i in range(8):
        s = b.render(i)
        assert s.mask.shape == s.image.shape[:2] and s.mask.dtype == np.uint8
        assert s.mask.max() < len(b.class_names)
        assert s.cls == main_class(s.mask, len(b.class_names))
        assert 6 <= s.meta["instances_drawn"] <= 12
        present = set(np.unique(s.mask)) - {0}
        assert {d["class"] for d in s.meta["defects"]} == present
        for k in present:  # per-instance visible areas add up to the mask's pixels of each class
            assert sum(d["area"] for d in s.meta["defects"] if d["class"] == k) == int((s.mask == k).sum())
        assert len(s.meta["defects"]) >= 2
        classes |= present
        grays.add(s.image.ndim == 2)
    assert len(classes) >= 5 and grays == {True, False}


def test_flat_fill_paints_exactly_the_mask_and_texture_uses_the_same_mask():
    flat = backend(image_size=80, **{"contours.fill": "flat", "contours.max_instances": 24})
    texture = backend(image_size=80, **{"contours.max_instances": 24})
    for i in range(6):
        f, t = flat.render(i), texture.render(i)
        image = f.image if f.image.ndim == 2 else f.image[..., 0]
        assert np.array_equal(image, f.mask)  # each pixel of mask k got its value from an instance of class k
        if f.image.ndim == 3:
            assert (f.image == f.image[..., :1]).all()
        assert np.array_equal(f.mask, t.mask)  # the textured frame is drawn from the very same rasterisation
        assert f.meta["instances"] == t.meta["instances"]


def test_mask_matches_an_independent_rasterisation():
    """One instance per frame, no per-instance noise: the mask is {pixel centres with |p - c| < R r(theta - rot)},
    recomputed here in float64 from the class contour and the placement in the metadata."""
    b = backend(image_size=64, **{"contours.min_instances": 1, "contours.max_instances": 1,
                                  "contours.instance_noise": 0.0, "contours.min_scale": 0.2})
    checked = 0
    for i in range(6):
        s = b.render(i)
        if not s.meta["instances"]:
            continue
        (shape,) = s.meta["instances"]
        cx, cy = shape["centre"]
        ys, xs = np.mgrid[0:64, 0:64].astype(np.float64) + 0.5
        dx, dy = xs - cx, ys - cy
        theta = np.arctan2(dy, dx) - math.radians(shape["rotation_deg"])
        table = b.shapes[shape["class_id"] - 1].astype(np.float64)
        grid = np.arange(TABLE + 1) * (2 * math.pi / TABLE)
        edge = shape["radius"] * np.interp(np.mod(theta, 2 * math.pi), grid, np.append(table, table[0]))
        rr = np.hypot(dx, dy)
        expected = np.where(rr < edge, shape["class_id"], 0)
        differ = s.mask != expected
        assert (np.abs(rr - edge)[differ] < 0.02).all()  # only float rounding right on the contour
        assert differ.sum() <= 2 and (s.mask > 0).sum() > 20
        checked += 1
    assert checked >= 3


def test_generate_cli_end_to_end(tmp_path, cli):
    out = tmp_path / "ds"
    res = cli("generate", *tiny_overrides(out, backend="contours", num_samples=12, samples_per_shard=4,
                                          image_format="png", **{"contours.num_classes": 5}))
    assert res.returncode == 0, res.stderr[-2000:]
    info = read_info(out)
    assert info.class_names == ["good", *(f"contour_0{k}" for k in range(1, 6))]
    assert info.num_samples == 12 and len(info.filenames) == 3
    assert "contours" in info.generator and "stylegan" not in info.generator
    assert verify_dataset(out) == []
    samples = [s for f in sorted(out.glob("*.tar")) for s in iter_shard(f)]
    direct = create_backend("contours", load_config(GenerateConfig, overrides=[
        *tiny_overrides(out, backend="contours", **{"contours.num_classes": 5})]))
    assert [s.meta["index"] for s in samples] == list(range(12))
    for s in samples[:3]:  # png: the shard holds exactly what the backend renders
        r = direct.render(s.meta["index"])
        assert np.array_equal(s.image, r.image) and np.array_equal(s.mask, r.mask) and s.cls == r.cls
    assert (out / INFO_FILE).is_file()


def test_procedural_datasets_do_not_record_the_contours_group(tiny_dataset):
    assert "contours" not in read_info(tiny_dataset).generator


@pytest.mark.parametrize("key,value,message", [
    ("contours.num_classes", 0, "contours.num_classes"),
    ("contours.max_instances", 300, "max_instances"),
    ("contours.min_scale", 0, "min_scale"),
    ("contours.fill", "solid", "contours.fill"),
    ("contours.gray_prob", 1.5, "contours.gray_prob"),
])
def test_bad_config_names_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(GenerateConfig, overrides=["backend=contours", f"{key}={value}"])


def test_bad_config_through_the_cli(tmp_path, cli):
    res = cli("generate", *tiny_overrides(tmp_path / "x", backend="contours", **{"contours.harmonics": 0}))
    assert_cli_error(res, 2, "contours.harmonics")


def test_help_lists_the_contours_keys(cli):
    res = cli("generate", "--help")
    assert res.returncode == 0
    for key in ("contours.num_classes", "contours.min_instances", "contours.fill", "contours.gray_prob"):
        assert key in res.stdout
