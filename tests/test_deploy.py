"""synthvit export / predict on a deploy folder: a finetune run's graphs in ONNX Runtime and OpenVINO give the PyTorch
predictor's probabilities and masks, int8 calibrates on training frames only, and a broken folder is one clear error.

The runtimes run in child processes only (exports and predictions through the CLI, comparisons in a child python):
their native thread pools never live in the test process, which goes on to fork and spawn workers in later tests."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import make_real_data, run_cli
from finetune.deploy import DeployError, need

if not all(importlib.util.find_spec(m) for m in ("onnxruntime", "openvino", "onnxscript")):
    pytest.skip("the onnx and openvino extras are not installed", allow_module_level=True)

COMPARE = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from finetune.artifacts import load_run
    from finetune.deploy import load_deployed
    run, folder, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reference, deployed = load_run(run).predictor("cpu"), load_deployed(folder).predictor()
    rng = np.random.default_rng(seed)
    worst, agree, total, mean_diffs = 0.0, 0, 0, []
    for size in ((70, 90), (40, 48), (33, 120)):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        a, b = reference(image), deployed(image)
        worst = max(worst, float((a["probs"] - b["probs"]).abs().max()))
        mean_diffs.append(float((a["probs"] - b["probs"]).abs().mean()))
        pa, pb = 1 - a["probs"][0], 1 - b["probs"][0]
        t = float(pa.median())
        agree += int(((pa > t) == (pb > t)).sum())
        total += pa.numel()
        if "cls_probs" in a:
            worst = max(worst, float((a["cls_probs"] - b["cls_probs"]).abs().max()))
    print(json.dumps({"worst": worst, "agree": agree / total, "mean_diffs": mean_diffs}))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished finetune runs on 10 tiny frames (a dark defect on grey): a ViT-Tiny + dpt-skip (seg + cls) and a
    DeepLabV3+, a few steps each so their maps are not flat."""
    root = tmp_path_factory.mktemp("deploy")
    data = make_real_data(root / "data", 10, (40, 48), lambda rng: np.s_[10:20, 12:24], name="im{}")
    out = {}
    for name, model, extra in (("vit", "vit_tiny_patch16_224", ["task=both", "decoder=dpt-skip"]),
                               ("cnn", "deeplabv3plus_resnet50", ["task=seg"])):
        out[name] = root / name
        run_cli("finetune", f"data={data}", f"out_dir={out[name]}", f"model={model}", "crop_size=32", "steps=4",
                "batch_size=2", "num_workers=0", "evaluate=false", "log_every=1", *extra, check=True)
    out["data"] = data
    return out


def export(run, out, *overrides):
    run_cli("export", f"checkpoint={run}", f"out={out}", *overrides, check=True)
    return out


def compare(run, folder, seed=0) -> dict:
    """In a child process, on three random frames of several tiles: the largest |p - p_ref| over every class
    probability and pixel, the mean |p - p_ref| per frame, and the share of pixels whose mask at the reference's
    median p(defect) (a mask's most fragile threshold) agrees."""
    out = subprocess.run([sys.executable, "-c", COMPARE, str(run), str(folder), str(seed)], capture_output=True,
                         text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name, fmt, exporter, precision", [
    ("vit", "onnx", "dynamo", "fp32"), ("vit", "openvino", "torchscript", "fp32"),
    ("cnn", "onnx", "torchscript", "fp32"), ("cnn", "openvino", "torchscript", "fp32"),
    ("vit", "onnx", "torchscript", "fp16"), ("cnn", "openvino", "torchscript", "fp16")])
def test_graphs_give_the_pytorch_predictions(runs, tmp_path, name, fmt, exporter, precision):
    folder = export(runs[name], tmp_path / "dep", f"format={fmt}", f"exporter={exporter}", f"precision={precision}")
    doc = json.loads((folder / "deploy.json").read_text())
    assert doc["format"] == fmt and doc["precision"] == precision and doc["tiling"]["tile"] == 32
    assert doc["meta"]["decision"]["rule"] == "shrink"  # the fitted decision travels with the folder
    assert set(doc["graphs"]) == ({"tiles", "image"} if name == "vit" else {"tiles"})
    found = compare(runs[name], folder)
    worst, agree = found["worst"], found["agree"]
    # fp16: the same probabilities to ~1e-4, but at the median of a nearly flat map that flips a pixel in ~500
    assert worst < 1e-3 and agree >= (0.999 if precision == "fp32" else 0.99), (worst, agree)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_int8_calibrates_on_training_frames_only(runs, tmp_path, fmt):
    """The test frames are made unreadable: an int8 export still succeeds (it never opens them), its probabilities
    stay near fp32's."""
    split = {r.split(",")[0]: r.split(",")[1] for r in (runs["cnn"] / "split.csv").read_text().splitlines()[1:]}
    tests = [k for k, v in split.items() if v == "test"]
    assert tests
    images = runs["data"] / "images"
    saved = {k: (images / f"{k}.png").read_bytes() for k in tests}
    try:
        for k in tests:
            (images / f"{k}.png").write_bytes(b"not a png")
        folder = export(runs["cnn"], tmp_path / "int8", f"format={fmt}", "precision=int8", "exporter=torchscript",
                        "calibration_tiles=16")
    finally:
        for k, data in saved.items():
            (images / f"{k}.png").write_bytes(data)
    doc = json.loads((folder / "deploy.json").read_text())
    assert doc["graphs"]["tiles"]["calibration"] == {"frames": "train (split.csv)", "inputs": 16, "seed": 0,
                                                     "tool": "nncf" if fmt == "openvino" else "onnxruntime.quantization"}
    diffs = compare(runs["cnn"], folder)["mean_diffs"]
    assert max(diffs) < 0.05, diffs


def test_predict_runs_a_deploy_folder_and_a_broken_one_is_one_line(runs, tmp_path):
    folder = export(runs["vit"], tmp_path / "dep", "format=onnx", "exporter=torchscript")
    images = runs["data"] / "images"
    run_cli("predict", f"checkpoint={folder}", f"input={images}", f"out={tmp_path / 'pred'}", check=True)
    run_cli("predict", f"checkpoint={runs['vit']}", f"input={images}", f"out={tmp_path / 'ref'}", check=True)
    for path in sorted((tmp_path / "ref").glob("im*.json")):
        a, b = json.loads(path.read_text()), json.loads((tmp_path / "pred" / path.name).read_text())
        assert abs(a["defect_score"] - b["defect_score"]) < 1e-3 and a["decision"] == b["decision"]
        assert a["predicted_class"] == b["predicted_class"]
        mask_a = np.asarray(Image.open(tmp_path / "ref" / a["mask"]))
        assert (mask_a == np.asarray(Image.open(tmp_path / "pred" / b["mask"]))).mean() >= 0.999
    model = folder / "tiles.onnx"
    model.write_bytes(model.read_bytes()[: os.path.getsize(model) // 2])  # truncated in a copy
    res = run_cli("predict", f"checkpoint={folder}", f"input={images}", f"out={tmp_path / 'p2'}")
    assert res.returncode == 1 and f"{model}: corrupt or truncated" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("export", f"checkpoint={runs['vit']}", f"out={folder}")
    assert res.returncode == 1 and f"out: {folder} exists" in res.stderr


def test_a_missing_runtime_names_its_extra(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_openvino(name, *args):
        if name == "openvino":
            raise ImportError(name)
        return real(name, *args)
    monkeypatch.setattr(importlib, "import_module", without_openvino)
    with pytest.raises(DeployError, match=r"openvino is not installed: pip install 'synthvit\[openvino\]'"):
        need("openvino")
