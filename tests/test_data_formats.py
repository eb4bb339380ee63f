"""Real-data formats as their tools write them (labelme, COCO, Pascal VOC palettes) and one split policy for all:
``splits.csv`` at the data root for every format, else a seeded split stratified by label or defect presence."""
import base64
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from conftest import rle_counts, rle_string
from finetune.config import FinetuneConfig
from synthvit.config import ConfigError, load_config
from synthvit.data import DataError, load_real_data, split_ids
from synthvit.io import SynthvitError

W, H = 40, 30


def png(path, value=100, size=(W, H), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path, fmt)
    return path


def polygon(label, points, **kw):
    return {"label": label, "points": points, "group_id": None, "description": "", "shape_type": "polygon",
            "flags": {}, **kw}


def labelme_doc(image_path, shapes, image_data=None):
    return {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path, "imageData": image_data,
            "imageHeight": H, "imageWidth": W}


def labelme_folder(root, n=4):
    """labelme as it writes with ``--output``: JSONs in annotations/, images in the sibling images/."""
    for i in range(n):
        png(root / "images" / f"part_{i:04d}.jpg", fmt="JPEG")
        shapes = [polygon("scratch", [[2, 2], [12, 2], [12, 8], [2, 8]])] if i % 2 else []
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"part_{i:04d}.json").write_text(
            json.dumps(labelme_doc(f"../images/part_{i:04d}.jpg", shapes)))
    return root


def coco_folder(root, n=4):
    for i in range(n):
        png(root / "images" / f"c{i}.png")
    (root / "annotations.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"c{i}.png", "width": W, "height": H} for i in range(n)],
        "categories": [{"id": 1, "name": "crack"}],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "area": 50.0,
                         "bbox": [1, 1, 9, 9], "segmentation": [[1, 1, 10, 1, 10, 10, 1, 10]]}
                        for i in range(n) if i % 2]}))
    return root


def imagefolder(root, n=4):
    for i in range(n):
        png(root / ("good" if i % 2 else "bad") / f"f{i}.png")
    return root


def hf_folder(root, n=4):
    import datasets

    ds = datasets.Dataset.from_dict({"image": [Image.new("L", (W, H), 9 * i) for i in range(n)],
                                     "label": [i % 2 for i in range(n)]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["ok", "nok"])}))
    ds.save_to_disk(str(root))
    return root


def canonical_folder(root, n=4):
    for i in range(n):
        png(root / "images" / f"im{i}.png")
    return root


FORMATS = {"labelme": (labelme_folder, lambda i: f"part_{i:04d}"), "coco": (coco_folder, lambda i: f"c{i}"),
           "imagefolder": (imagefolder, lambda i: f"{'good' if i % 2 else 'bad'}/f{i}"),
           "hf": (hf_folder, lambda i: f"{i:06d}"), "canonical": (canonical_folder, lambda i: f"im{i}")}


def write_splits(root, rows):
    (root / "splits.csv").write_text("id,split\n" + "".join(f"{i},{s}\n" for i, s in rows))


# ---------------------------------------------------------------------------------------------- the split policy
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_splits_csv_is_honoured_by_every_format(tmp_path, fmt):
    build, name = FORMATS[fmt]
    root = build(tmp_path / fmt)
    expected = {name(i): "test" if i in (0, 3) else "train" for i in range(4)}
    write_splits(root, expected.items())
    data = load_real_data(root)
    assert data.fmt == fmt
    for seed in range(3):  # the user's fixed test set, whatever the seed
        assert split_ids(data, 0.5, seed) == expected


@pytest.mark.parametrize("fmt", ["labelme", "imagefolder"])
def test_splits_csv_problems_are_listed_in_one_error(tmp_path, fmt):
    build, name = FORMATS[fmt]
    root = build(tmp_path / fmt, n=5)
    write_splits(root, [(name(0), "train"), (name(0), "test"),  # conflicting rows
                        (name(1), "train"), (name(1), "train"),  # a repeated row is no conflict
                        (name(2), "validation"),  # neither train nor test
                        ("ghost", "test")])  # no such image; name(3) and name(4) are not listed
    with pytest.raises(DataError) as e:
        load_real_data(root)
    msg = str(e.value)
    for part in (f"id {name(0)!r} is listed as train (line 2) and test (line 3)", "'validation'", "'ghost'",
                 "no split for 2 image(s)", name(3), name(4), "split_missing=train", "4 problem(s)"):
        assert part in msg, msg
    assert f"{name(1)!r}" not in msg


def test_split_missing_puts_unlisted_images_in_train_or_test(tmp_path):
    root = imagefolder(tmp_path / "f", n=4)
    write_splits(root, [("bad/f0", "test")])
    with pytest.raises(DataError, match="no split for 3 image"):
        load_real_data(root)
    train = load_real_data(root, split_missing="train")
    assert split_ids(train, 0.5, 0) == {"bad/f0": "test", "good/f1": "train", "bad/f2": "train", "good/f3": "train"}
    test = load_real_data(root, split_missing="test")
    assert set(split_ids(test, 0.5, 0).values()) == {"test"}
    # the finetune config key: a Literal with a help string, error by default
    assert FinetuneConfig().split_missing == "error"
    assert load_config(FinetuneConfig, overrides=["split_missing=test"]).split_missing == "test"
    with pytest.raises(ConfigError, match="split_missing"):
        load_config(FinetuneConfig, overrides=["split_missing=val"])


def test_seeded_split_is_stratified_by_defect_presence_without_labels(tmp_path):
    root = tmp_path / "c"
    for i in range(10):
        png(root / "images" / f"im{i}.png")
        m = np.zeros((H, W), np.uint8)
        if i in (3, 7):
            m[5:9, 5:9] = 255
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
    data = load_real_data(root)
    assert not data.has_labels and data.has_masks
    for seed in range(10):  # one of the two defective images in test, every time
        split = split_ids(data, 0.5, seed)
        assert [split["im3"], split["im7"]].count("test") == 1, (seed, split)
        assert list(split.values()).count("test") == 5
    # without validation the defect presence is read from the masks once, as the split needs it
    unchecked = load_real_data(root, check=False)
    assert split_ids(unchecked, 0.5, 4) == split_ids(data, 0.5, 4)


def test_finetune_split_follows_splits_csv_for_labelme_and_logs_counts(tmp_path, cli, caplog, one_torch_thread):
    root = labelme_folder(tmp_path / "lm", n=6)
    expected = {f"part_{i:04d}": "test" if i in (0, 1) else "train" for i in range(6)}
    write_splits(root, expected.items())
    run = tmp_path / "run"
    caplog.set_level(logging.INFO)
    res = cli("finetune", f"data={root}", f"out_dir={run}", "model=vit_tiny_patch16_224", "crop_size=32",
              "steps=1", "batch_size=2", "num_workers=0", "evaluate=false", "drop_path=0")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (run / "split.csv").read_text().splitlines()
    assert rows[0] == "id,split" and dict(r.split(",") for r in rows[1:]) == expected
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("train split", "test split"))]
    assert lines == ["train split (splits.csv): 4 images; 2 with a defect, 2 defect-free",
                     "test split (splits.csv): 2 images; 1 with a defect, 1 defect-free"], caplog.text
    # evaluate takes the run's own split.csv; a run folder from before split_missing read unlisted images as train
    write_splits(root, [("part_0000", "test")])
    config = run / "config.yaml"
    config.write_text("".join(ln for ln in config.read_text().splitlines(True) if not ln.startswith("split_missing")))
    (run / "split.csv").write_text("id,split\n" + "".join(f"part_{i:04d},{'test' if i < 3 else 'train'}\n"
                                                          for i in range(6)))
    ev = cli("evaluate", "--checkpoint", run, "--split", "test")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads((run / "metrics_test.json").read_text())["images"] == 3


# ---------------------------------------------------------------------------------------------- labelme
def test_labelme_as_labelme_writes_it(tmp_path, caplog):
    root = tmp_path / "lm"
    png(root / "images" / "part_0001.jpg", fmt="JPEG")
    png(root / "images" / "part_0002.png")
    shapes = [polygon("scratch", [[2, 2], [12, 2], [12, 8], [2, 8]], group_id=1),
              polygon("scratch", [[14, 2], [18, 2], [18, 6]], group_id=1),  # one instance with the first
              polygon("pit", [[29, 19], [20, 10]], shape_type="rectangle"),  # corners as dragged, bottom-right first
              polygon("pit", [[33, 5], [33, 8]], shape_type="circle"),  # centre, a point on the circle: radius 3
              polygon("scratch", [[0, 25], [39, 25]], shape_type="line"),
              polygon("scratch", [[5, 12], [5, 20], [15, 20]], shape_type="linestrip"),
              polygon("dent", [[1, 1]], shape_type="point")]  # marks no area: skipped with a warning
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "part_0001.json").write_text(json.dumps(labelme_doc("../images/part_0001.jpg", shapes)))
    (root / "annotations" / "part_0002.json").write_text(json.dumps(labelme_doc(
        "..\\images\\part_0002.png", [polygon("pit", [[1, 1], [5, 1], [5, 5]])])))  # saved on Windows
    buf = io.BytesIO()
    Image.new("L", (W, H), 60).save(buf, "PNG")  # the image only inside the JSON (labelme's "save image data")
    (root / "annotations" / "part_0003.json").write_text(json.dumps(labelme_doc(
        "../images/part_0003.png", [polygon("pit", [[30, 20], [38, 20], [38, 28]])],
        base64.b64encode(buf.getvalue()).decode())))
    caplog.set_level(logging.WARNING)
    data = load_real_data(root)
    assert data.fmt == "labelme" and [i.id for i in data.items] == ["part_0001", "part_0002", "part_0003"]
    assert data.seg_classes == ["background", "pit", "scratch"]  # 'dent' marks only a point: no class
    assert "1 point shape(s) skipped" in caplog.text and "part_0001.json" in caplog.text
    m = data.items[0].mask((W, H))
    assert m[5, 5] == 2 and m[3, 16] == 2  # both polygons of group 1
    assert m[15, 25] == 1 and m[10, 20] == 1 and m[19, 29] == 1  # the rectangle, corners included
    assert m[5, 33] == 1 and m[5, 36] == 1 and m[5, 37] == 0 and m[1, 33] == 0  # the circle of radius 3
    assert m[24:27, 20].tolist() == [2, 2, 2] and m[22, 20] == 0 and m[28, 20] == 0  # a 3 px line
    assert m[16, 5] == 2 and m[20, 10] == 2 and m[16, 10] == 0  # the linestrip, not its hull
    assert m[1, 1] == 0
    assert data.items[1].mask((W, H))[3, 3] == 1
    with data.items[2].load() as im:
        assert im.size == (W, H) and np.asarray(im)[0, 0] == 60
    assert data.items[2].mask((W, H))[21, 37] == 1


def test_labelme_malformed_shapes_are_problems_not_tracebacks(tmp_path):
    root = tmp_path / "lm"
    png(root / "images" / "a.png")
    png(root / "images" / "b.png")
    (root / "json").mkdir(parents=True)
    (root / "json" / "a.json").write_text(json.dumps(labelme_doc("../images/a.png", [
        polygon("ok", [[1, 1], [6, 1], [6, 4]]),
        {"points": [[1, 1], [6, 1], [6, 4]], "shape_type": "polygon"},  # no label
        polygon("scratch", [[1, 1], [6, 4]]),  # a polygon of two points
        polygon("scratch", [[1, 1], [6, 4]], shape_type="ellipse"),  # no such labelme shape
        polygon("scratch", "1,1,6,1,6,4"),  # points of the wrong type
        polygon(3, [[1, 1], [6, 1], [6, 4]]),  # a label of the wrong type
        polygon("pit", [[1, 1], [6, 1], [6, 4]], shape_type="circle"),  # a circle takes two points
        "polygon"])))
    (root / "json" / "b.json").write_text(json.dumps(labelme_doc("../images/gone.png", [])))  # no image, no data
    with pytest.raises(DataError) as e:
        load_real_data(root)
    msg = str(e.value)
    for part in ("a.json: shape 1: no label", "a.json: shape 2 (polygon): 2 point(s), a polygon needs at least 3",
                 "a.json: shape 3: shape_type 'ellipse' is not supported", "a.json: shape 4 (polygon): points must "
                 "be", "a.json: shape 5: label 3 is not a string", "a.json: shape 6 (circle): 3 point(s), a circle "
                 "needs 2", "a.json: shape 7 is str, not a shape object", "b.json: image '../images/gone.png' not "
                 "found", "8 problem(s)"):
        assert part in msg, msg
    assert "shape 0" not in msg


# ---------------------------------------------------------------------------------------------- COCO
def test_coco_crowd_rle_and_images_without_annotations(tmp_path):
    root = tmp_path / "coco"
    for name in ("a", "b", "c"):
        png(root / "images" / f"{name}.png")
    crowd = np.zeros((H, W), np.uint8)
    crowd[3:9, 20:31] = 1
    crowd2 = np.zeros((H, W), np.uint8)
    crowd2[20:25, 2:8] = 1
    (root / "instances_default.json").write_text(json.dumps({
        "images": [{"id": k, "file_name": f"{n}.png", "width": W, "height": H} for k, n in enumerate("abc")],
        "categories": [{"id": 1, "name": "crack"}, {"id": 2, "name": "stain"}],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 1, "iscrowd": 0, "area": 20.0, "bbox": [1, 1, 9, 9],
             "segmentation": [[1, 1, 10, 1, 10, 10, 1, 10]]},
            {"id": 2, "image_id": 0, "category_id": 2, "iscrowd": 1, "area": 66.0, "bbox": [20, 3, 11, 6],
             "segmentation": {"size": [H, W], "counts": rle_string(rle_counts(crowd))}},  # compressed
            {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 30.0, "bbox": [2, 20, 6, 5],
             "segmentation": {"size": [H, W], "counts": rle_counts(crowd2)}}]}))  # uncompressed; c: none
    data = load_real_data(root)
    assert data.fmt == "coco" and data.seg_classes == ["background", "crack", "stain"]
    a, b, c = (data.items[k].mask((W, H)) for k in range(3))
    assert a[5, 5] == 1 and a[5, 25] == 2 and (a == 2).sum() == crowd.sum()
    assert np.array_equal(b, crowd2)
    assert not c.any()  # an image without annotations is defect-free
    # image labels: the category covering most of the image's annotated area, 'good' without annotations
    assert [i.label for i in data.items] == ["stain", "crack", "good"]
    assert data.cls_classes == ["good", "crack", "stain"]
    data.check_task("both")


def test_coco_bbox_only_annotations_are_refused_for_seg(tmp_path):
    root = tmp_path / "coco"
    for name in ("a", "b"):
        png(root / "images" / f"{name}.png")
    (root / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                   {"id": 2, "file_name": "b.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "crack"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "area": 81.0,
                         "segmentation": []}, {"id": 8, "image_id": 1, "category_id": 1, "bbox": [20, 5, 3, 3]}]}))
    data = load_real_data(root)
    data.check_task("cls")
    assert [i.label for i in data.items] == ["crack", "good"]
    for task in ("seg", "both"):
        with pytest.raises(SynthvitError) as e:
            data.check_task(task)
        msg = str(e.value)
        assert "annotations.json" in msg and "2 annotation(s)" in msg and "task=cls" in msg \
            and "add segmentations" in msg, msg


# ---------------------------------------------------------------------------------------------- Pascal VOC
def test_pascal_voc_palette_masks_with_void_255(tmp_path):
    """SegmentationClass PNGs: mode P, pixel value = class index, 255 = void (object boundaries): read as
    background, since training has no ignore label."""
    root = tmp_path / "voc"
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]  # VOC's colours, 255 cream
    (root / "masks").mkdir(parents=True)
    for i in range(3):
        png(root / "images" / f"2007_00{i}.jpg", fmt="JPEG")
        m = np.zeros((H, W), np.uint8)
        m[5:15, 5:15] = 255  # the void band around the object
        m[6:14, 6:14] = 1 + i % 2
        mask = Image.frombytes("P", (W, H), m.tobytes())
        mask.putpalette(palette)
        mask.save(root / "masks" / f"2007_00{i}.png")
    data = load_real_data(root)
    assert data.seg_classes == ["background", "class_1", "class_2"]
    m = data.items[1].mask((W, H))
    assert m[10, 10] == 2 and m[5, 5] == 0 and m.max() == 2
    (root / "classes.txt").write_text("background\naeroplane\nbicycle\n")
    assert load_real_data(root).seg_classes == ["background", "aeroplane", "bicycle"]
