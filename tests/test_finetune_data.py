"""Each real-data format on tiny generated fixtures, and each bad input named in one error."""
import json

import numpy as np
import pytest
from PIL import Image

from synthvit.data import DataError, load_real_data, rle_decode, split_ids, to_array


def write_image(path, size=(40, 30), mode="L", value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]) if mode in ("L", "I;16") else (size[1], size[0], 3), value,
                  np.uint16 if mode == "I;16" else np.uint8)
    Image.fromarray(arr).save(path)


def canonical(root, n=6, binary=True):
    for i in range(n):
        write_image(root / "images" / f"im{i}.png")
        m = np.zeros((30, 40), np.uint8)
        if i % 2:
            m[5:10, 5:20] = 255 if binary else 2
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
    (root / "labels.csv").write_text("id,label\n" + "".join(f"im{i},{'crack' if i % 2 else 'good'}\n"
                                                            for i in range(n)))
    return root


def test_canonical_layout(tmp_path):
    data = load_real_data(canonical(tmp_path / "c"))
    assert data.fmt == "canonical" and len(data.items) == 6
    assert data.seg_classes == ["background", "defect"] and data.cls_classes == ["good", "crack"]
    item = data.items[1]
    assert item.label == "crack" and data.label_index(item) == 1
    mask = item.mask((40, 30))
    assert mask.shape == (30, 40) and set(np.unique(mask)) == {0, 1} and mask.sum() == 75
    split = split_ids(data, 0.34, seed=0)
    assert list(split.values()).count("test") == 2  # stratified: one of the three per label
    assert {data.items[int(i[2:])].label for i, s in split.items() if s == "test"} == {"good", "crack"}
    assert split == split_ids(data, 0.34, seed=0)


def test_canonical_multiclass_masks_and_splits_csv(tmp_path):
    root = canonical(tmp_path / "c", binary=False)
    (root / "splits.csv").write_text("id,split\n" + "".join(f"im{i},{'test' if i < 2 else 'train'}\n"
                                                            for i in range(6)))
    data = load_real_data(root)
    assert data.seg_classes == ["background", "class_1", "class_2"]
    assert split_ids(data, 0.3, 0) == {f"im{i}": "test" if i < 2 else "train" for i in range(6)}
    (root / "classes.txt").write_text("background\nscratch\nstain\n")
    assert load_real_data(root).seg_classes == ["background", "scratch", "stain"]


def test_imagefolder(tmp_path):
    for cls in ("good", "bad"):
        for i in range(3):
            write_image(tmp_path / "f" / cls / f"{i}.jpg", mode="RGB")
    data = load_real_data(tmp_path / "f")
    assert data.fmt == "imagefolder" and data.cls_classes == ["good", "bad"] and not data.has_masks
    assert len(data.items) == 6 and data.items[0].id.startswith("bad/")


def test_labelme(tmp_path):
    root = tmp_path / "lm"
    write_image(root / "a.png")
    (root / "a.json").write_text(json.dumps({"imagePath": "a.png", "shapes": [
        {"label": "scratch", "shape_type": "polygon", "points": [[2, 2], [12, 2], [12, 8], [2, 8]]},
        {"label": "pit", "shape_type": "rectangle", "points": [[20, 10], [29, 19]]}]}))
    data = load_real_data(root)
    assert data.fmt == "labelme" and data.seg_classes == ["background", "pit", "scratch"]
    mask = data.items[0].mask((40, 30))
    assert mask[5, 5] == 2 and mask[15, 25] == 1 and mask[25, 35] == 0


def test_coco_polygons_and_rle(tmp_path):
    root = tmp_path / "coco"
    write_image(root / "images" / "a.png")
    write_image(root / "images" / "b.png")
    rle = np.zeros((30, 40), np.uint8)
    rle[3:6, 10:15] = 1
    counts, flat, cur, run = [], rle.T.reshape(-1), 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            run, cur = 0, v
        run += 1
    counts.append(run)
    (root / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
        "categories": [{"id": 7, "name": "crack"}, {"id": 9, "name": "dent"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": [[1, 1, 10, 1, 10, 10, 1, 10]]},
                        {"id": 2, "image_id": 2, "category_id": 9,
                         "segmentation": {"size": [30, 40], "counts": counts}}]}))
    data = load_real_data(root)
    assert data.fmt == "coco" and data.seg_classes == ["background", "crack", "dent"]
    assert data.items[0].mask((40, 30))[5, 5] == 1
    assert np.array_equal(data.items[1].mask((40, 30)), rle * 2)


def test_coco_rle_counts_and_compressed_string():
    # column-major runs 2 zeros, 4 ones, 4 zeros, 2 ones of a 4x3 mask
    expected = np.array([0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1], np.uint8).reshape(3, 4).T
    assert np.array_equal(rle_decode({"counts": [2, 4, 4, 2]}, 4, 3), expected)
    # pycocotools' string form of the same counts (rleToString): "2", "4", "4", then 2 - 4 = -2 as "N"
    assert np.array_equal(rle_decode({"counts": "244N"}, 4, 3), expected)


def test_hf_save_to_disk(tmp_path):
    import datasets

    imgs = [Image.fromarray(np.full((30, 40), 50 * i, np.uint8)) for i in range(4)]
    masks = [Image.fromarray((np.arange(1200).reshape(30, 40) % 2 * (i % 2)).astype(np.uint8)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": imgs, "mask": masks, "label": [0, 1, 0, 1]},
                                    features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["ok", "nok"])}))
    ds.save_to_disk(str(tmp_path / "hf"))
    data = load_real_data(tmp_path / "hf")
    assert data.fmt == "hf" and data.cls_classes == ["ok", "nok"] and data.has_masks
    assert data.items[1].label == "nok" and data.items[1].mask((40, 30)).max() == 1


def test_pixel_formats():
    assert to_array(Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16))).shape == (2, 2, 3)
    g16 = to_array(Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16)), channels=1)
    assert g16.dtype == np.uint8 and g16.max() == 255 and g16.min() == 0
    rgba = Image.new("RGBA", (3, 2), (200, 100, 50, 255))
    assert to_array(rgba)[0, 0].tolist() == [200, 100, 50]
    pal = Image.new("P", (3, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_array(pal)[0, 0].tolist() == [10, 20, 30]
    rotated = Image.new("L", (4, 2))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90
    import io
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", exif=exif)
    assert to_array(Image.open(buf), channels=1).shape == (4, 2)


def test_bad_inputs_are_listed_in_one_error(tmp_path):
    root = canonical(tmp_path / "bad")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "im0.png")  # wrong size
    Image.fromarray(np.full((30, 40), 7, np.uint8)).save(root / "masks" / "im2.png")  # value 7 with 0/255 masks
    (root / "images" / "im4.png").write_bytes(b"not an image")  # unreadable
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "masks" / "ghost.png")  # mask without image
    with open(root / "labels.csv", "a") as f:
        f.write("nobody,crack\n")  # id without image
    with pytest.raises(DataError) as e:
        load_real_data(root)
    msg = str(e.value)
    for part in ("im0.png: mask is 10x10, image is 40x30", "im4.png: unreadable image",
                 "masks/ghost.png: no image with id 'ghost'", "labels.csv: id 'nobody' has no image",
                 "masks/im2.png: values [7] in binary (0/255) masks", "5 problem(s)"):
        assert part in msg, msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_real_data(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_real_data(tmp_path / "nope")


def test_error_lists_first_20_and_a_count(tmp_path):
    root = tmp_path / "many"
    for i in range(25):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"x{i:02d}.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"25 problem\(s\)[\s\S]*and 5 more"):
        load_real_data(root)


def test_pixel_cap_is_configurable(tmp_path):
    root = canonical(tmp_path / "c", n=2)
    with pytest.raises(DataError, match="unreadable image"):
        load_real_data(root, max_pixels=100)  # 40x30 = 1200 px is more than twice the cap: refused
    assert len(load_real_data(root, max_pixels=10_000).items) == 2


def test_defect_centred_crops_pick_the_same_pixel_with_remembered_coordinates():
    from types import SimpleNamespace

    from finetune.train import crop_pair

    rng = np.random.default_rng(3)
    mask = (rng.random((90, 130)) > 0.97).astype(np.uint8)
    image = rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)
    cfg = SimpleNamespace(crop_size=32)
    for seed in range(20):
        a = crop_pair(image, mask, cfg, np.random.default_rng(seed), True)
        b = crop_pair(image, mask, cfg, np.random.default_rng(seed), True, np.flatnonzero(mask))
        r = np.random.default_rng(seed)  # the pixel np.nonzero's row-major order gives for the same draw
        ys, xs = np.nonzero(mask)
        j = int(r.integers(len(ys)))
        y0 = int(np.clip(ys[j] - 16 + r.integers(-8, 9), 0, 90 - 32))
        x0 = int(np.clip(xs[j] - 16 + r.integers(-8, 9), 0, 130 - 32))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert np.array_equal(a[1], mask[y0:y0 + 32, x0:x0 + 32])
