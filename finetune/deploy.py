"""A finished finetune run as a folder a production runtime runs: ``synthvit export`` and its predictor.

``synthvit export checkpoint=RUN format=onnx|openvino precision=fp32|fp16|int8`` writes, into one folder:

- ``tiles.onnx`` / ``tiles.xml`` + ``tiles.bin`` (a dense head): the model over a batch of ``tile`` x ``tile`` tiles
  (the batch dimension dynamic), normalisation and softmax inside the graph: raw pixel values (float32, 0..255) in,
  per-class probabilities out -- what :class:`~finetune.tiling.Tiler` blends;
- ``image.onnx`` / ``image.xml`` (a classifier head): the same for the whole frame resized to the crop size;
- ``deploy.json``: the format and precision, each graph's file, input, output and sha256, the tiling (tile, overlap,
  tiles per batch), the run's export meta (classes, normalisation, the fitted decision: rule and threshold), the
  frames int8 was calibrated on, the versions that wrote it and the run it came from: the folder alone is
  deployable (``synthvit predict checkpoint=FOLDER`` runs it through the same tiler, blending and decision).

ONNX graphs come from ``torch.onnx.export`` (the dynamo exporter, opset 18); OpenVINO IR from ``openvino``'s
``convert_model`` of that graph (``compress_to_fp16`` for fp16). INT8 is ONNX Runtime's static quantization (QDQ,
per-channel weights), its activation ranges calibrated on seeded tiles of the run's *training* frames only (its
``split.csv``; the test frames are never read); OpenVINO runs that QDQ graph in int8 as it is. fp16 under ONNX
Runtime converts the graph's weights and arithmetic to half precision, inputs and outputs kept float32.

The folder is written beside its final place and renamed into it in one step (a stopped export leaves no folder that
looks whole); a model file whose sha256 differs from ``deploy.json`` (truncated, corrupted) is one error naming it.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.artifacts import load_run, read_split
from finetune.config import ExportConfig
from finetune.evaluate import Predictor, check_input_size
from finetune.tiling import Tiler, auto_tile_batch
from synthvit import __version__
from synthvit.data import load_real_data, to_array
from synthvit.io import SynthvitError, atomic_write_text, dumps_json, writable_dir
from synthvit.models.export import ExportConfigError, ExportMeta, meta_stats
from synthvit.training import has_attention

log = logging.getLogger("synthvit.export")

DEPLOY_FILE = "deploy.json"
DEPLOY_VERSION = 1
EXTRAS = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino"), "onnx-export": ("onnxscript", "onnx"),
          "nncf": ("nncf", "openvino")}
OPSET = 18
MAX_BATCH = 4096  # the largest tile batch the exported graphs are declared for
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # precision=int8 quantizes these (weights and their inputs)


class DeployError(SynthvitError):
    pass


def need(name: str):
    """Import the runtime module of ``name`` (a key of :data:`EXTRAS`), or an error naming the extra to install."""
    module, extra = EXTRAS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DeployError(f"{module} is not installed: pip install 'synthvit[{extra}]' (or .[{extra}] in a "
                          f"checkout)") from None


class TileGraph(nn.Module):
    """Raw tiles (B, C, t, t) float32 0..255 -> per-class probabilities (B, K, t, t): normalisation, the model's
    dense head, softmax."""

    def __init__(self, model: nn.Module, meta: ExportMeta):
        super().__init__()
        self.model = model
        mean, std = meta_stats(meta, "cpu")
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).clone())

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.model((tiles - self.mean) / self.std)["seg"].float().softmax(1)


class ImageGraph(TileGraph):
    """A frame resized to the crop size (B, C, s, s) float32 0..255 -> classifier probabilities (B, K)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)["cls"].float().softmax(1)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _export_onnx(graph: nn.Module, side: int, in_chans: int, path: Path, input_name: str, output_name: str,
                 exporter: str = "dynamo") -> None:
    """``graph`` as an ONNX file with a dynamic batch dimension (``exporter``: torch's dynamo or torchscript one)."""
    example = torch.rand(2, in_chans, side, side) * 255
    names = dict(input_names=[input_name], output_names=[output_name])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes are not the user's to act on
        if exporter == "torchscript":
            torch.onnx.export(graph.eval(), (example,), str(path), dynamo=False, opset_version=OPSET, **names,
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
            return
        need("onnx-export")
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        program = torch.onnx.export(graph.eval(), (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                    dynamic_shapes=({0: batch},), optimize=True, **names)
        program.save(str(path))


def calibration_tiles(run, tile: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` tiles (N, C, tile, tile) float32 0..255 drawn (seeded) from the run's *training* frames (its
    ``split.csv``): what int8 calibrates its activation ranges on; test frames are never opened."""
    split = read_split(run.folder)
    if not split:
        raise DeployError(f"precision=int8: {run.folder} has no split.csv to draw its training frames from")
    cfg = run.cfg
    try:
        data = load_real_data(Path(cfg.data), cfg.format, check=False, split_missing=cfg.split_missing)
    except SynthvitError as e:
        raise DeployError(f"precision=int8 calibrates on the run's training frames, and its data ({cfg.data}) "
                          f"cannot be read: {e}") from None
    train = sorted((i for i in data.items if split.get(i.id) == "train"), key=lambda i: i.id)
    if not train:
        raise DeployError(f"precision=int8: none of the training frames {run.folder}/split.csv lists is in "
                          f"{cfg.data} any more")
    rng = np.random.default_rng(seed)
    tiler = Tiler(tile, cfg.tiling.overlap, 1)
    tiles: list[np.ndarray] = []
    for k in rng.permutation(len(train)):
        with train[int(k)].load() as im:
            arr = to_array(im, run.meta.in_chans)
        arr = arr[..., None] if arr.ndim == 2 else arr
        frame = torch.from_numpy(np.array(arr)).permute(2, 0, 1)
        pad_h, pad_w = max(0, tile - frame.shape[1]), max(0, tile - frame.shape[2])
        if pad_h or pad_w:
            frame = torch.nn.functional.pad(frame, (0, pad_w, 0, pad_h))
        grid = tiler.grid(frame.shape[1], frame.shape[2])
        for j in rng.permutation(len(grid))[:max(1, count // len(train) + 1)]:
            y, x = grid[int(j)]
            tiles.append(frame[:, y:y + tile, x:x + tile].float().numpy())
        if len(tiles) >= count:
            break
    return np.stack(tiles[:count])


def _quantize_int8(src: Path, dst: Path, input_name: str, samples: np.ndarray) -> None:
    """ONNX Runtime static quantization (QDQ, per-channel int8 weights, int8 activations) calibrated on ``samples``."""
    ort = need("onnx")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: samples[i:i + 8]} for i in range(0, len(samples), 8)])

        def get_next(self):
            return next(self.batches, None)

    prepared = src.with_suffix(".prep.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    # the weighted ops only: the logits and the softmax stay float32 (int8 steps on a p(defect) of ~1e-2 flatten the
    # ranking pixel AP reads: 0.082 -> 0.031 on a DeepPCB ViT cell with every op quantized)
    quantize_static(str(prepared), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(QUANTIZED_OPS))
    prepared.unlink()
    del ort


def _fp16(src: Path, dst: Path) -> None:
    need("onnx")
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def _to_openvino(src: Path, dst: Path, precision: str, samples: np.ndarray | None = None,
                 transformer: bool = False) -> list[str]:
    """The ONNX graph ``src`` as OpenVINO IR; int8: quantized by NNCF (OpenVINO's own post-training tool) on
    ``samples``, the logits and softmax kept float."""
    ov = need("openvino")
    model = ov.convert_model(str(src))
    if precision == "int8":
        nncf = need("nncf")
        model = nncf.quantize(model, nncf.Dataset([samples[i:i + 1] for i in range(len(samples))]),
                              subset_size=len(samples),
                              model_type=nncf.ModelType.TRANSFORMER if transformer else None,
                              ignored_scope=nncf.IgnoredScope(types=["Softmax"], validate=False))
    ov.save_model(model, str(dst), compress_to_fp16=precision == "fp16")
    return [dst.name, dst.with_suffix(".bin").name]


def run_export(cfg: ExportConfig) -> Path:
    if not cfg.checkpoint:
        raise DeployError("checkpoint: give a finished finetune run folder (checkpoint=runs/my-run)")
    need(cfg.format)
    run = load_run(cfg.checkpoint)
    meta = run.meta
    out = Path(cfg.out) if cfg.out else run.folder / f"deploy-{cfg.format}-{cfg.precision}"
    if out.is_dir() and not cfg.overwrite:
        raise DeployError(f"out: {out} exists; give another out= or overwrite=true")
    created = not out.exists()
    writable_dir(out, "out")  # a file in the way, a read-only place: one line before any work
    if created:
        out.rmdir()  # the folder appears whole, at the end, or not at all
    tile = cfg.tile or run.cfg.tiling.tile or meta.img_size
    model = run.model
    if meta.heads.has_seg:
        check_input_size(model, tile, "tile")
        if tile != meta.img_size:  # a ViT resamples its position embeddings, on its own copy
            model = copy.deepcopy(model)
            model.set_input_size(tile)
    staging = out.parent / f".{out.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    t0 = time.perf_counter()
    graphs = {}
    heads = [("tiles", TileGraph(model, meta), tile)] if meta.heads.has_seg else []
    if meta.heads.has_cls:
        heads.append(("image", ImageGraph(run.model, meta), meta.img_size))
    for name, graph, side in heads:
        output = "probs" if name == "tiles" else "cls_probs"
        onnx_path = staging / f"{name}.fp32.onnx"
        _export_onnx(graph, side, meta.in_chans, onnx_path, name, output, cfg.exporter)
        final = staging / f"{name}.onnx"
        calibration = samples = None
        if cfg.precision == "int8":
            samples = calibration_tiles(run, side, cfg.calibration_tiles) if name == "tiles" else \
                _resized_train_frames(run, side, cfg.calibration_tiles)
            calibration = {"frames": "train (split.csv)", "inputs": int(len(samples)), "seed": 0,
                           "tool": "nncf" if cfg.format == "openvino" else "onnxruntime.quantization"}
        if cfg.precision == "int8" and cfg.format == "onnx":
            _quantize_int8(onnx_path, final, name, samples)
        elif cfg.precision == "fp16" and cfg.format == "onnx":
            _fp16(onnx_path, final)
        else:
            onnx_path.rename(final)
        onnx_path.unlink(missing_ok=True)
        files = [final.name]
        if cfg.format == "openvino":
            files = _to_openvino(final, staging / f"{name}.xml", cfg.precision, samples, has_attention(model))
            final.unlink()
        graphs[name] = {"files": {f: sha256(staging / f) for f in files}, "input": name, "output": output,
                        "side": side, "calibration": calibration}
    tiling = run.cfg.tiling
    doc = {"version": DEPLOY_VERSION, "format": cfg.format, "precision": cfg.precision, "graphs": graphs,
           "tiling": {"tile": tile, "overlap": tiling.overlap,
                      "batch_size": tiling.batch_size or auto_tile_batch(tile, has_attention(model))},
           "input": "float32 pixel values 0..255, channels first; normalisation and softmax are in the graphs",
           "max_pixels": run.cfg.max_pixels, "meta": meta.to_json(), "exporter": cfg.exporter,
           "source": {"run": str(run.folder), "synthvit": __version__, "torch": torch.__version__,
                      "runtime": _runtime_version(cfg.format)}}
    atomic_write_text(staging / DEPLOY_FILE, dumps_json(doc, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    log.info("export: %s %s in %.1f s -> %s", cfg.format, cfg.precision, time.perf_counter() - t0, out)
    print(f"synthvit export: done -> {out}")
    return out


def _resized_train_frames(run, side: int, count: int) -> np.ndarray:
    """The classifier's calibration inputs: up to ``count`` training frames resized to ``side`` (float32 0..255)."""
    from PIL import Image

    split = read_split(run.folder) or {}
    data = load_real_data(Path(run.cfg.data), run.cfg.format, check=False, split_missing=run.cfg.split_missing)
    out = []
    for item in sorted((i for i in data.items if split.get(i.id) == "train"), key=lambda i: i.id)[:count]:
        with item.load() as im:
            arr = to_array(im, run.meta.in_chans)
        arr = np.asarray(Image.fromarray(arr).resize((side, side), Image.BILINEAR))
        arr = arr[..., None] if arr.ndim == 2 else arr
        out.append(arr.transpose(2, 0, 1).astype(np.float32))
    if not out:
        raise DeployError(f"precision=int8: no training frame of {run.folder} to calibrate the classifier on")
    return np.stack(out)


def _runtime_version(fmt: str) -> str:
    module = need(fmt)
    return getattr(module, "__version__", "")


# --------------------------------------------------------------------------------------------- running a folder
def is_deploy_folder(path: str | Path) -> bool:
    return (Path(path) / DEPLOY_FILE).is_file()


class Session:
    """One graph of a deploy folder in its runtime: ``session(batch)`` numpy float32 in, numpy float32 out."""

    def __init__(self, fmt: str, folder: Path, graph: dict, threads: int):
        first = next(iter(graph["files"]))
        path = folder / first
        if fmt == "onnx":
            ort = need("onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            try:
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise DeployError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); export "
                                  f"again") from None
            self.input = graph["input"]
            self.run = lambda x: self.session.run(None, {self.input: x})[0]
        else:
            ov = need("openvino")
            core = ov.Core()
            try:
                compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                 "INFERENCE_PRECISION_HINT": "f32"})
            except Exception as e:  # openvino raises RuntimeError with a long trace
                raise DeployError(f"{path}: OpenVINO cannot load it ({str(e).splitlines()[0][:200]}); export "
                                  f"again") from None
            request = compiled.create_infer_request()
            self.run = lambda x: np.array(request.infer({0: x})[compiled.output(0)])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(batch, dtype=np.float32))


@dataclass
class DeployedRun:
    """A deploy folder read and checked: its deploy.json, export meta and graphs."""
    folder: Path
    doc: dict
    meta: ExportMeta

    @property
    def max_pixels(self) -> int:
        return int(self.doc.get("max_pixels") or 0)

    def predictor(self, device=None) -> RuntimePredictor:
        return RuntimePredictor(self)


def load_deployed(folder: str | Path) -> DeployedRun:
    """The deploy folder ``folder``: deploy.json read, every model file present with the sha256 it names."""
    folder = Path(folder)
    path = folder / DEPLOY_FILE
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("version") != DEPLOY_VERSION:
            raise ValueError(f"not a deploy.json of version {DEPLOY_VERSION}")
        fmt, graphs = doc["format"], doc["graphs"]
        meta = ExportMeta.from_json(doc["meta"], path)
        tiling = doc["tiling"]
        int(tiling["tile"]), float(tiling["overlap"]), int(tiling["batch_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DeployError(f"{path}: unreadable ({e}); export the run again with synthvit export") from None
    except ExportConfigError as e:
        raise DeployError(str(e)) from None
    if fmt not in ("onnx", "openvino"):
        raise DeployError(f"{path}: format {fmt!r} is not onnx or openvino")
    need(fmt)
    for graph in graphs.values():
        for name, digest in graph["files"].items():
            file = folder / name
            if not file.is_file():
                raise DeployError(f"{file}: missing (deploy.json names it); copy the whole folder or export again")
            if sha256(file) != digest:
                raise DeployError(f"{file}: corrupt or truncated (its sha256 differs from the one deploy.json "
                                  f"names); copy it again or export again")
    return DeployedRun(folder, doc, meta)


class RuntimePredictor(Predictor):
    """:class:`~finetune.evaluate.Predictor` over a deploy folder's graphs in ONNX Runtime or OpenVINO: the same
    tiler, blending and outputs, the graph in place of the PyTorch model (normalisation and softmax inside it)."""

    def __init__(self, deployed: DeployedRun):
        doc, self.meta = deployed.doc, deployed.meta
        tiling = doc["tiling"]
        self.tiler = Tiler(int(tiling["tile"]), float(tiling["overlap"]), int(tiling["batch_size"]))
        threads = torch.get_num_threads()
        self.sessions = {name: Session(doc["format"], deployed.folder, graph, threads)
                         for name, graph in doc["graphs"].items()}
        self.device = torch.device("cpu")

    def _seg(self, frame: torch.Tensor, k: int) -> torch.Tensor:
        session = self.sessions["tiles"]
        return self.tiler(frame, lambda t: torch.from_numpy(session(t.numpy())), k)

    def _cls(self, small: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sessions["image"](small.numpy()))[0]
