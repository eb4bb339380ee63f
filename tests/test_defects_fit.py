"""defects.fit: the procedural defects' size, aspect, orientation, contrast and count distributions read off the
labelled train defects of a real-data folder (test images never read), written into the resolved config, and drawn
from by every painter: generated sizes pass a KS test against the real ones, a mismatched fit fails it."""
from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw
from scipy import stats

import generate.defects.fit as fit_module
from conftest import tiny_overrides
from generate.config import DEFECTS, GenerateConfig
from generate.defects import draw_defects, paint_defect
from generate.defects.fit import FitError, fit_defects, measure_train, unwrap_angles
from generate.defects.painters import MIN_ALPHA
from generate.defects.shape import measure, quantile_cdf
from generate.run import run
from generate.schema import read_info
from synthvit.config import CONFIG_FILE, ConfigError, load_config
from synthvit.data import split_ids

SIDE = 128
CELL = SIDE // 3  # one defect per grid cell: no two touch


def ellipse(draw: ImageDraw.ImageDraw, cy: float, cx: float, length: float, aspect: float, angle: float, fill: int):
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    a, b, th = length / 2, aspect * length / 2, math.radians(angle)
    x, y = a * np.cos(t), b * np.sin(t)
    xs, ys = cx + x * math.cos(th) - y * math.sin(th), cy - (x * math.sin(th) + y * math.cos(th))
    draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=fill)


def make_defects(root, n: int = 120, size=(10.0, 38.0), seed: int = 0):
    """``n`` grey frames (canonical layout, labels good/dark); 3 in 4 hold 1-3 dark ellipses (class 1) or bright
    ones (class 2) of log-uniform length in ``size`` px, aspect 0.25..1, any angle, each in its own grid cell."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["id,label"]
    for i in range(n):
        img = Image.fromarray((rng.random((SIDE, SIDE)) * 20 + 110).astype(np.uint8))
        mask = Image.new("L", (SIDE, SIDE), 0)
        defective = i % 4 != 0
        if defective:
            for cell in rng.choice(9, int(rng.integers(1, 4)), replace=False):
                cy, cx = (cell // 3 + 0.5) * CELL, (cell % 3 + 0.5) * CELL
                length = math.exp(rng.uniform(math.log(size[0]), math.log(size[1])))
                aspect, angle, cls = rng.uniform(0.25, 1.0), rng.uniform(0, 180), int(rng.integers(1, 3))
                ellipse(ImageDraw.Draw(img), cy, cx, length, aspect, angle, 60 if cls == 1 else 190)
                ellipse(ImageDraw.Draw(mask), cy, cx, length, aspect, angle, cls)
        img.save(root / "images" / f"f{i:03d}.png")
        mask.save(root / "masks" / f"f{i:03d}.png")
        lines.append(f"f{i:03d},{'dark' if defective else 'good'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("background\ndark\nbright\n")
    return root


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return make_defects(tmp_path_factory.mktemp("fit") / "data")


def fitted_config(root, *extra) -> GenerateConfig:
    return fit_defects(load_config(GenerateConfig, overrides=[f"defects.fit={root}", *extra]))


def generated(d, n: int, side: int = 160) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Length (share of the short side), aspect and angle of ``n`` defects painted from ``d``, every class in
    turn, as their masks cover them."""
    out = []
    for i in range(n):
        stamp = paint_defect(np.random.default_rng((7, i)), d, DEFECTS[i % len(DEFECTS)], side, side, 1, 256.0)
        g = measure(stamp.alpha >= MIN_ALPHA)
        out.append((g.length / side, g.aspect, g.angle))
    return tuple(np.array(v) for v in zip(*out))


def test_generated_sizes_follow_the_fitted_distribution_and_a_mismatched_fit_fails(real):
    cfg = fitted_config(real)
    d = cfg.defects
    real_sizes = np.array([i.size for i in measure_train(str(real)).instances])
    assert len(real_sizes) > 100 and len(d.size) == 11
    sizes, aspects, angles = generated(d, 1200)
    matched = stats.ks_2samp(sizes, real_sizes).pvalue
    to_fit = stats.kstest(sizes, lambda x: quantile_cdf(x, d.size, log=True)).pvalue
    print(f"KS p-values, matched: vs real {matched:.3g}, vs fitted {to_fit:.3g}")
    assert matched > 0.01 and to_fit > 0.01
    for factor, limit in ((3.0, 1e-9), (1.25, 1e-3)):  # the same test fails a fit whose sizes are off
        wrong = dataclasses.replace(d, size=[v * factor for v in d.size])
        off, _, _ = generated(wrong, 400)
        p_real = stats.ks_2samp(off, real_sizes).pvalue
        p_fit = stats.kstest(off, lambda x: quantile_cdf(x, d.size, log=True)).pvalue
        print(f"KS p-values, sizes x{factor}: vs real {p_real:.3g}, vs fitted {p_fit:.3g}")
        assert p_fit < limit
        if factor == 3.0:
            assert p_real < limit
    # aspect and orientation follow theirs too (the angles of round defects are noise: elongated ones only)
    real_inst = measure_train(str(real)).instances
    assert stats.ks_2samp(aspects, [i.aspect for i in real_inst]).pvalue > 0.01
    long = aspects < 0.6
    assert stats.ks_2samp(angles[long], [i.angle for i in real_inst if i.aspect < 0.6]).pvalue > 0.01
    # default painters (no fit) measure nothing like these
    plain, _, _ = generated(dataclasses.replace(d, size=[], aspect=[], orientation=[]), 200)
    assert stats.ks_2samp(plain, real_sizes).pvalue < 1e-6


def test_count_contrast_and_defect_free_share_follow_the_fit(real):
    d = fitted_config(real).defects
    assert d.defect_free_prob == pytest.approx(0.25, abs=0.05)  # a quarter of the frames are good
    assert len(d.count) == 3 == d.max_defects and sum(d.count) == pytest.approx(1.0)
    assert all(p == pytest.approx(1 / 3, abs=0.12) for p in d.count)
    dark, bright = d.contrast[0], d.contrast[-1]
    assert dark == pytest.approx(60 / 255 - 120 / 255, abs=0.03) and bright == pytest.approx(70 / 255, abs=0.03)
    free, counts, changes = 0, [], []
    for i in range(400):
        img = np.full((1, SIDE, SIDE), 0.5, np.float32)
        drawn = draw_defects(np.random.default_rng((3, i)), img, d, 256.0)
        free += not drawn.instances
        if drawn.instances:
            counts.append(len(drawn.instances))
            changes += [float(img[0][drawn.inst == k + 1].mean()) - 0.5 for k in range(len(drawn.instances))
                        if (drawn.inst == k + 1).sum() > 20]
    assert free / 400 == pytest.approx(d.defect_free_prob, abs=0.06)
    assert np.bincount(counts, minlength=4)[1:] / len(counts) == pytest.approx(d.count, abs=0.08)
    # contrast on a flat frame: the drawn change of grey level (overlaps aside) follows the fit: dark ones as dark,
    # bright ones as bright, none near 0 (no interpolation across the gap between them)
    changes = np.array(changes)
    assert (changes < 0).mean() == pytest.approx(0.45, abs=0.06)  # 4.5 of the 10 quantile bins are dark
    assert np.median(changes[changes < 0]) == pytest.approx(dark, abs=0.02)
    assert np.median(changes[changes > 0]) == pytest.approx(bright, abs=0.02)
    assert (abs(changes) < 0.15).mean() < 0.03


def test_test_images_are_never_read(real, monkeypatch):
    real_load = fit_module.load_real_data
    seen = {}

    def poisoned(root, fmt="auto", **kw):
        data = real_load(root, fmt, **kw)
        split = split_ids(data, 0.3, 0)

        def boom(*_):
            raise AssertionError("a test image was read by the fit")

        for item in data.items:
            if split[item.id] == "test":
                item.load, item.mask = boom, boom
        seen["test"] = sum(s == "test" for s in split.values())
        seen["train"] = len(split) - seen["test"]
        return data

    monkeypatch.setattr(fit_module, "load_real_data", poisoned)
    d = fitted_config(real).defects
    assert seen["test"] > 20 and d.size and f": {seen['train']} frames, " in d.fitted
    assert "train split" in d.fitted and str(real) in d.fitted and "classes pooled: dark, bright" in d.fitted


def test_the_resolved_config_holds_the_numbers_and_reproduces_the_run_without_the_data(real, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(real, data)
    out = tmp_path / "a"
    run(load_config(GenerateConfig, overrides=tiny_overrides(out, num_samples=6, samples_per_shard=6, preview=0,
                                                              image_size=64) + [f"defects.fit={data}"]))
    resolved = yaml.safe_load((out / CONFIG_FILE).read_text())["defects"]
    expected = fitted_config(data).defects
    for key in ("size", "aspect", "orientation", "contrast", "count", "defect_free_prob", "max_defects", "fitted"):
        assert resolved[key] == getattr(expected, key)
    assert resolved["fit"] == str(data)
    shutil.rmtree(data)  # the numbers alone: the folder is gone
    again = tmp_path / "b"
    run(load_config(GenerateConfig, out / CONFIG_FILE, overrides=[f"out_dir={again}"]))
    assert [s.sha256 for s in read_info(again).shards] == [s.sha256 for s in read_info(out).shards]


def test_fit_stats_choose_what_is_fitted(real):
    d = fitted_config(real, "defects.fit_stats=[size,count]", "defects.defect_free_prob=0.6").defects
    assert d.size and d.count and not d.aspect and not d.orientation and not d.contrast
    assert d.defect_free_prob == 0.6


def test_a_folder_without_labelled_train_defects_is_one_clear_error(tmp_path):
    root = make_defects(tmp_path / "empty", n=8)
    for p in (root / "masks").iterdir():  # masks without a defect pixel
        Image.new("L", (SIDE, SIDE), 0).save(p)
    with pytest.raises(FitError, match=r"defects\.fit: .*empty.* has no labelled defect .* train split"):
        fitted_config(root)
    test_only = make_defects(tmp_path / "test_only", n=8)  # every defect in the test split
    (test_only / "splits.csv").write_text("id,split\n" + "".join(
        f"f{i:03d},{'train' if i % 4 == 0 else 'test'}\n" for i in range(8)))
    with pytest.raises(FitError, match=r"test_only.* has no labelled defect .*splits\.csv"):
        fitted_config(test_only)
    with pytest.raises(FitError, match="is not a folder"):
        fitted_config(tmp_path / "nowhere")


def test_fitted_keys_are_checked():
    for bad in ("defects.size=[0.3,0.1]", "defects.aspect=[0.5,1.5]", "defects.count=[0.5,0.2]",
                "defects.orientation=[0,200]", "defects.fit_stats=[shape]"):
        with pytest.raises(ConfigError):
            load_config(GenerateConfig, overrides=[bad])


def test_angles_are_unwrapped_around_their_widest_gap():
    a = unwrap_angles([1.0, 3.0, 178.0, 175.0, 2.0])
    assert sorted(a.tolist()) == [175.0, 178.0, 181.0, 182.0, 183.0]
    assert unwrap_angles([10.0, 50.0, 90.0]).tolist() == [10.0, 50.0, 90.0]


def test_compare_fits_each_budget_set_to_the_data_and_split_it_trains_on(real, tmp_path):
    from synthvit.compare.config import CompareConfig, ModelSpec
    from synthvit.compare.synthetic import plan_sets
    from synthvit.data import load_real_data

    gen = tmp_path / "fit.yaml"
    gen.write_text("backend: procedural\ndefects: {fit: somewhere/else}\n")
    cfg = CompareConfig(data=str(real), out_dir=str(tmp_path / "cmp"), budgets=[10],
                        models=[ModelSpec(name="syn", model="vit_tiny_patch16_224", synthetic=str(gen))])
    data = load_real_data(real)
    split = split_ids(data, cfg.finetune.test_fraction, cfg.finetune.data_seed)
    train = [i for i in data.items if split[i.id] == "train"]
    (job,) = plan_sets(cfg, data, train, [10], len(train), write=False)
    for key, value in (("procedural.backgrounds", real), ("defects.fit", real),
                       ("defects.fit_test_fraction", cfg.finetune.test_fraction),
                       ("defects.fit_data_seed", cfg.finetune.data_seed)):
        assert f"{key}={value}" in job.argv


def test_fitted_defects_drawn_into_your_own_frames_measure_like_yours(real):
    from generate.backends import create_backend
    from generate.defects.fit import measure_frame

    cfg = fitted_config(real, f"procedural.backgrounds={real}", "image_size=96", "defects.defect_free_prob=0",
                        "defects.fit_stats=[size,aspect,orientation,contrast,count]")
    backend = create_backend("procedural", cfg)
    found = []
    for i in range(12):
        s = backend.render(i)
        assert s.mask.any() and s.meta["background"]["id"]
        found += measure_frame(s.image.astype(np.float32) / 255.0, s.mask)[0]
    contrasts = np.array([f.contrast for f in found if f.contrast is not None])
    d = cfg.defects
    assert (contrasts < -0.1).mean() == pytest.approx((np.array(d.contrast) < 0).mean(), abs=0.3)
    assert np.median(np.abs(contrasts)) == pytest.approx(np.median(np.abs(d.contrast)), abs=0.06)
