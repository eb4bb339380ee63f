import pytest
import torch

from finetune.tiling import Tiler, ramp_window, tile_starts


@pytest.mark.parametrize("length, tile, overlap", [(3840, 512, 0.1), (2160, 512, 0.1), (517, 128, 0.25),
                                                   (128, 128, 0.1), (100, 128, 0.1), (1000, 64, 0.0)])
def test_tile_starts_cover_with_overlap_and_snap_to_the_border(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    if length > tile:
        assert starts[-1] == length - tile
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(0 < g <= tile - round(tile * overlap) for g in gaps)
    covered = torch.zeros(max(length, tile), dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered[:length].all()


def test_ramp_window_is_smooth_positive_and_symmetric():
    w = ramp_window(64, 8)
    assert torch.all(w > 0) and torch.equal(w, w.flip(0)) and w[8:-8].eq(1).all()
    assert torch.all(w[1:9] > w[:8])


@pytest.mark.parametrize("size, tile", [((3, 60, 100), 128), ((3, 300, 517), 128), ((1, 517, 300), 96),
                                        ((3, 2160, 3840), 512)])
def test_identity_model_reproduces_the_input(size, tile):
    g = torch.Generator().manual_seed(0)
    frame = torch.randint(0, 256, size, dtype=torch.uint8, generator=g)
    tiler = Tiler(tile=tile, overlap=0.1, batch_size=4)
    out = tiler(frame, lambda t: t, num_outputs=size[0])
    assert out.shape == size and out.dtype == torch.float32
    assert torch.allclose(out, frame.float(), atol=1e-4)
    assert torch.equal(out.round().to(torch.uint8), frame)


@pytest.mark.parametrize("size", [(40, 50), (300, 517), (2160, 3840)])
def test_blend_weights_sum_to_one(size):
    tiler = Tiler(tile=256, overlap=0.25)
    out = tiler(torch.zeros(1, *size, dtype=torch.uint8), lambda t: torch.ones(len(t), 2, 256, 256), num_outputs=2)
    assert torch.allclose(out, torch.ones(2, *size), atol=1e-5)


def test_overlaps_are_blended_smoothly_not_averaged():
    """Each tile predicts its own constant: the stitched map changes gradually across every overlap band."""
    tiler = Tiler(tile=100, overlap=0.2, batch_size=1)
    counter = iter(range(1000))
    out = tiler(torch.zeros(1, 100, 260), lambda t: torch.full((1, 1, 100, 100), float(next(counter))),
                num_outputs=1)[0, 0]
    steps = (out[1:] - out[:-1]).abs()
    assert steps.max() < 0.1  # an average of overlapping constants would jump by 0.5 at the band edges
    assert out[0] == 0 and out[-1] == 2


def test_bad_tiler_arguments():
    with pytest.raises(ValueError, match="overlap"):
        Tiler(overlap=0.6)
    with pytest.raises(ValueError, match="tile"):
        Tiler(tile=4)
    with pytest.raises(ValueError, match="batch_size: 0"):
        Tiler(batch_size=0)


def test_auto_tile_batch_fills_half_a_megapixel_for_vits_and_keeps_the_output():
    """tiling.batch_size=0: a ViT's small tiles go in batches of 0.5 Mpx, large ones in 8 (never fewer); a CNN's in 8.
    tiling.streams=0: two streams on a CPU with two or more compute threads, else one. What is predicted per pixel
    depends on neither."""
    from finetune.config import TilingConfig
    from finetune.evaluate import Predictor
    from finetune.tiling import auto_tile_batch, tile_streams
    from synthvit.models import ExportMeta, Heads, create_model

    assert [auto_tile_batch(t, True) for t in (64, 128, 256, 512, 1024)] == [128, 32, 8, 8, 8]
    assert [auto_tile_batch(t, False) for t in (64, 128, 512)] == [8, 8, 8]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert tile_streams(torch.device("cpu")) == 2 and tile_streams(torch.device("cuda")) == 1
        torch.set_num_threads(1)
        assert tile_streams(torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(threads)
    names = ["background", "defect"]
    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch16_224", "seg", seg_classes=2, img_size=64).eval()
    cnn = create_model("resnet18", "seg", seg_classes=2).eval()
    frame = torch.randint(0, 256, (300, 500, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for model, name, want in ((vit, "vit_tiny_patch16_224", 128), (cnn, "resnet18", 8)):
        meta = ExportMeta(model=name, in_chans=3, img_size=64, heads=Heads.parse("seg"), class_names=names,
                          seg_classes=names, mean=[0.5] * 3, std=[0.5] * 3)
        auto = Predictor(model, meta, "cpu", TilingConfig(precision="fp32"))
        assert auto.tiler.batch_size == want
        fixed = Predictor(model, meta, "cpu", TilingConfig(precision="fp32", batch_size=3))
        assert fixed.tiler.batch_size == 3
        assert torch.allclose(auto(frame.numpy())["probs"], fixed(frame.numpy())["probs"], atol=1e-5)


def test_8k_frame_is_processed_one_batch_of_tiles_at_a_time():
    frame = torch.zeros(1, 4320, 7680, dtype=torch.uint8)
    seen = []

    def predict(t):
        seen.append(t.shape[0])
        return t
    out = Tiler(tile=512, overlap=0.1, batch_size=4)(frame, predict, num_outputs=1)
    assert out.shape == (1, 4320, 7680) and max(seen) <= 4
    assert sum(seen) == Tiler(tile=512, overlap=0.1).num_tiles(4320, 7680) == 10 * 17


def test_inference_precision_key_picks_the_autocast_dtype(monkeypatch):
    from finetune import tiling
    from synthvit import training

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tiling.inference_dtype("fp32", cuda) is None and tiling.inference_dtype("fp32", cpu) is None
    assert tiling.inference_dtype("bf16", cpu) is torch.bfloat16 and tiling.inference_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert tiling.inference_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.resolve_precision("auto") == "bf16"  # training's `precision: auto` likewise
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)  # emulated bf16 is slower than fp32: not taken
    assert tiling.inference_dtype("auto", cpu) is None
    assert training.resolve_precision("auto") == "no"
    assert training.resolve_precision("fp16") == "fp16" and training.resolve_precision("no") == "no"


def test_bf16_inference_is_close_to_fp32_and_fp32_is_exact():
    import numpy as np

    from finetune.artifacts import build_model
    from finetune.config import FinetuneConfig, TilingConfig
    from finetune.evaluate import Predictor
    from synthvit.models import ExportMeta, Heads

    cfg = FinetuneConfig(model="vit_tiny_patch16_224", task="seg", crop_size=32, drop_path=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, 3, 3).eval()
    names = ["background", "a", "b"]
    meta = ExportMeta(model=cfg.model, in_chans=3, img_size=32, heads=Heads.parse("seg"), class_names=names,
                      seg_classes=names, mean=[0.5] * 3, std=[0.25] * 3)
    frame = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    probs = {p: Predictor(model, meta, torch.device("cpu"), TilingConfig(precision=p))(frame)["probs"]
             for p in ("fp32", "bf16")}
    with torch.inference_mode():
        x = (torch.from_numpy(frame[:32, :32]).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
        exact = model(x)["seg"].softmax(1)[0]
    assert torch.allclose(probs["fp32"][:, :20, :20], exact[:, :20, :20], atol=1e-5)  # away from the blended band
    assert not torch.equal(probs["fp32"], probs["bf16"])  # the key changes the arithmetic...
    assert (probs["fp32"] - probs["bf16"]).abs().max() < 0.05  # ...within bf16's precision


def test_bf16_tiling_casts_each_weight_once_per_frame_with_the_same_output():
    """Under bf16 autocast a frame's weights are cast once, not once per batch of tiles (autocast's cast cache lives
    for one region and never under inference_mode), and the output is what a region per batch gives."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 1)  # a weight of shape (5, 3, 1, 1): its casts are easy to count
    frame = torch.rand(3, 200, 300)
    tiler = Tiler(tile=64, overlap=0.1, batch_size=2)
    assert tiler.num_tiles(200, 300) // 2 >= 5  # several batches

    def casts_of_the_weight(prof):
        return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                   if e.key == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == [5, 3, 1, 1])

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = tiler(frame, lambda t: conv(t).float().softmax(1), 5, autocast_dtype=torch.bfloat16)
    assert casts_of_the_weight(prof) == 1
    by_batch = torch.zeros_like(out)  # the old way: an autocast region per batch, under inference_mode
    with torch.inference_mode():
        for positions, tiles in tiler.batches(frame):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = conv(tiles).float().softmax(1)
            for (y, x), p in zip(positions, pred):
                by_batch[:, y:y + 64, x:x + 64] += p * ramp_window(64, 6)[:, None] * ramp_window(64, 6)[None, :]
    _, sum_y = tiler._axis_weights(200, "cpu")
    _, sum_x = tiler._axis_weights(300, "cpu")
    torch.testing.assert_close(out, by_batch / (sum_y[:, None] * sum_x[None, :]), rtol=0, atol=1e-6)


def test_streams_run_alternate_batches_in_threads_with_a_share_of_the_cores_and_blend_the_same():
    """tiling.streams=2: two threads run every other batch, each with half of torch's compute threads; the map is
    the one-stream map; torch's thread count is restored afterwards."""
    import threading

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        frame = torch.randint(0, 256, (3, 300, 517), dtype=torch.uint8, generator=g)
        seen = []

        def predict(t):
            seen.append((threading.current_thread().name, torch.get_num_threads(), len(t)))
            return torch.cat([t / 255, (t[:, :1] * 0.5).sin()], 1)
        tiler = Tiler(tile=64, overlap=0.1, batch_size=3)
        one = tiler(frame, predict, num_outputs=4)
        assert {name for name, _, _ in seen} == {threading.current_thread().name}
        seen.clear()
        two = tiler(frame, predict, num_outputs=4, streams=2)
        assert torch.equal(one, two)
        assert {name for name, _, _ in seen} == {"tiler-stream-0", "tiler-stream-1"}
        assert {n for _, n, _ in seen} == {1} and sum(b for _, _, b in seen) == tiler.num_tiles(300, 517)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_an_error_in_a_stream_is_raised_and_the_streams_end():
    import threading

    threads = torch.get_num_threads()
    calls = []

    def predict(t):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("tile model failed")
        return t
    with pytest.raises(RuntimeError, match="tile model failed"):
        Tiler(tile=32, overlap=0.0, batch_size=1)(torch.zeros(1, 320, 320), predict, num_outputs=1, streams=2)
    assert torch.get_num_threads() == threads
    assert not [t for t in threading.enumerate() if t.name.startswith("tiler-stream")]
