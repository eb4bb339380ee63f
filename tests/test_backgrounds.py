"""Synthetic defects drawn into the user's own defect-free frames (procedural.backgrounds): tiny backgrounds made
here, never ../shared."""
import json

import numpy as np
import pytest
from PIL import Image

from generate.backends import create_backend
from generate.backgrounds import BackgroundError, find_backgrounds
from generate.config import GenerateConfig
from generate.schema import INFO_FILE, encode_sample
from synthvit.config import load_config


def config(folder, *extra, size=48):
    return load_config(GenerateConfig, overrides=[f"procedural.backgrounds={folder}", f"image_size={size}",
                                                  "defects.defect_free_prob=0", *extra])


def textured(rng, shape, level):
    """A tile-like frame: a grey level with stripes and sensor noise."""
    h, w = shape[:2]
    stripes = 12 * np.sin(np.arange(w) / 3.0)[None, :]
    img = level + stripes + rng.normal(0, 4, (h, w))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.stack([img, (img * 0.8).astype(np.uint8), img], -1) if len(shape) == 3 else img


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    rng = np.random.default_rng(0)
    Image.fromarray(textured(rng, (80, 100), 30)).save(folder / "dark.png")  # grey
    Image.fromarray(textured(rng, (64, 72), 200)).save(folder / "bright.png")  # grey
    Image.fromarray(textured(rng, (60, 90, 3), 120)).save(folder / "colour.png")
    return folder


def source_crop(folder, record, size):
    """The background pixels a sample was drawn into, cut from the file with the sample's recorded box."""
    im = np.asarray(Image.open(folder / f"{record['id']}.png"))
    x0, y0, x1, y1 = record["box"]
    return im[int(y0):int(y1), int(x0):int(x1)]


def test_defects_in_plain_backgrounds_keep_every_other_pixel_and_follow_the_background(plain):
    backend = create_backend("procedural", config(plain))
    seen, channels = set(), {}
    for i in range(24):
        s = backend.render(i)
        record = s.meta["background"]
        seen.add(record["id"])
        bg = source_crop(plain, record, 48)
        assert s.image.shape == bg.shape and bg.shape[:2] == (48, 48)
        channels[record["id"]] = s.meta["channels"]
        # exact masks: outside the mask the frame is the background's own pixels, inside the defect changed it
        outside, inside = s.mask == 0, s.mask > 0
        assert np.array_equal(s.image[outside], bg[outside])
        assert inside.any() and s.meta["defects"]
        change = np.abs(s.image.astype(float) - bg)[inside].mean()
        assert change > 6, (i, record, change)  # visible on dark and bright frames alike (> 1.5 noise std)
    assert seen == {"dark", "bright", "colour"}
    assert channels == {"dark": 1, "bright": 1, "colour": 3}  # grey backgrounds give grey samples
    again = create_backend("procedural", config(plain, "num_samples=7", "samples_per_shard=3"))
    for i in (0, 5, 17):  # sample i depends on (seed, i) alone: background choice and crop included
        assert encode_sample(i, again.render(i)) == encode_sample(i, backend.render(i))
    other_seed = create_backend("procedural", config(plain, "seed=1"))
    assert encode_sample(5, other_seed.render(5)) != encode_sample(5, backend.render(5))


def test_resize_fit_and_small_backgrounds_are_scaled_up_with_a_warning(plain, caplog):
    whole = create_backend("procedural", config(plain, "procedural.backgrounds_fit=resize"))
    assert whole.render(0).meta["background"]["box"][:2] == [0, 0]
    big = create_backend("procedural", config(plain, size=96))
    with caplog.at_level("WARNING"):
        big.validate()
    assert "3 of 3 backgrounds are smaller than 96x96" in caplog.text
    s = big.render(3)
    assert s.image.shape[:2] == (96, 96) and s.meta["background"]["box"][2] <= 100


def real_folder(root, test_ids=()):
    """A canonical real-data folder: ok* images defect-free (empty masks), bad* with a defect; splits.csv."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    rows = ["id,split"]
    for name in ("ok0", "ok1", "ok2", "bad0", "bad1"):
        Image.fromarray(textured(rng, (50, 60), 90)).save(root / "images" / f"{name}.png")
        mask = np.zeros((50, 60), np.uint8)
        if name.startswith("bad"):
            mask[10:20, 10:30] = 1
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
        rows.append(f"{name},{'test' if name in test_ids else 'train'}")
    (root / "splits.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_real_data_folder_gives_only_its_defect_free_train_images(tmp_path):
    from generate.run import run

    root = real_folder(tmp_path / "real", test_ids=("ok1", "bad1"))
    out = tmp_path / "shards"
    run(config(root, f"out_dir={out}", "num_samples=40", "samples_per_shard=20", "num_workers=0", size=32))
    info = json.loads((out / INFO_FILE).read_text())
    record = info["backgrounds"]
    assert record["ids"] == ["ok0", "ok2"] and record["format"] == "canonical"
    assert record["left_out"] == {"test": 2, "defective": 1}
    import webdataset as wds

    used = {json.loads(s["json"])["background"]["id"] for s in wds.WebDataset(
        [str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False)}
    assert used == {"ok0", "ok2"}  # the test image ok1 never, the defective train image never


def test_labelled_class_folders_use_the_defect_free_label(tmp_path):
    rng = np.random.default_rng(2)
    for label in ("good", "crack"):
        (tmp_path / "cls" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(textured(rng, (40, 40), 100)).save(tmp_path / "cls" / label / f"{label}{i}.png")
    sources, record = find_backgrounds(str(tmp_path / "cls"), test_fraction=0.25)
    assert record["format"] == "imagefolder" and all(i.startswith("good") for i in record["ids"])
    assert len(record["ids"]) == 3 and record["left_out"]["defective"] == 3
    with pytest.raises(BackgroundError, match="no defect-free image.*defect-free: ok"):
        find_backgrounds(str(tmp_path / "cls"), labels=("ok",))


def test_bad_backgrounds_fail_before_any_shard_naming_the_culprits(tmp_path, plain):
    from generate.run import run

    def fails(folder, match, *extra):
        out = tmp_path / f"out-{folder.name}"
        with pytest.raises(BackgroundError, match=match):
            run(config(folder, f"out_dir={out}", "num_samples=4", "num_workers=0", *extra))
        assert not list(out.glob("*.tar")) if out.exists() else True

    fails(tmp_path / "missing", "is not a folder")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "holds no images")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.png"):
        (broken / name).write_bytes((plain / "dark.png").read_bytes())
    (broken / "c.png").write_bytes((plain / "dark.png").read_bytes()[:200])  # truncated
    (broken / "d.jpg").write_bytes(b"not an image")
    fails(broken, r"2 unreadable image\(s\).*c\.png.*d\.jpg")
    all_bad = real_folder(tmp_path / "allbad", test_ids=("ok0", "ok1", "ok2"))
    fails(all_bad, r"no defect-free image in its train split \(3 test, 2 defective")


def test_stylegan_anomalies_in_backgrounds(plain):
    cfg = config(plain, "backend=stylegan", "stylegan.anomaly_prob=1", "stylegan.channel_max=16",
                 "stylegan.batch_size=4", size=32)
    backend = create_backend("stylegan", cfg)
    assert backend.class_names[-1] == "anomaly"
    for s in backend.render_batch([0, 1, 2, 3]):
        bg = source_crop(plain, s.meta["background"], 32)
        assert np.array_equal(s.image[s.mask == 0], bg[s.mask == 0])
        assert {d["name"] for d in s.meta["defects"]} == {"anomaly"}
    with pytest.raises(Exception, match="anomaly_prob"):
        create_backend("stylegan", config(plain, "backend=stylegan", size=32))


def test_a_dataset_made_before_a_key_existed_still_resumes(tmp_path, plain):
    """generate reads an earlier run's config.yaml with today's defaults: a key added since is no change."""
    import yaml

    from generate.run import run

    out = tmp_path / "resume"
    cfg = load_config(GenerateConfig, overrides=[f"out_dir={out}", "image_size=32", "num_samples=4",
                                                 "num_workers=0"])
    run(cfg)
    written = yaml.safe_load((out / "config.yaml").read_text())
    for key in ("backgrounds", "backgrounds_fit", "defect_free_labels"):
        del written["procedural"][key]
    (out / "config.yaml").write_text(yaml.safe_dump(written))
    run(cfg)  # resumes (nothing left to do) instead of refusing a "different config"
    changed = load_config(GenerateConfig, overrides=[f"out_dir={out}", "image_size=32", "num_samples=4",
                                                     "num_workers=0", "seed=1"])
    with pytest.raises(Exception, match="different config"):
        run(changed)
