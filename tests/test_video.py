"""predict on a video file (PyAV): one JSON line per frame with the still-frame predictor's score, an overlay video,
realtime dropping counted, and broken or unopenable input reported without a traceback."""
import json
import time
from fractions import Fraction

import numpy as np
import pytest

from conftest import assert_cli_error, make_real_data, run_cli
from finetune.artifacts import FinetuneRun, load_run

av = pytest.importorskip("av")

FRAMES, RATE = 12, 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = make_real_data(tmp_path_factory.mktemp("video") / "data", 8, (40, 48), lambda rng: np.s_[10:20, 12:24],
                          name="im{}")
    out = root.parent / "run"
    run_cli("finetune", f"data={root}", f"out_dir={out}", "task=both", "crop_size=32", "steps=2", "batch_size=2",
            "num_workers=0", "evaluate=false", "log_every=1", check=True)
    return out


def write_clip(path, n=FRAMES, rate=RATE):
    """A grey clip (48 x 40) with a dark bar moving right, H.264."""
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=Fraction(rate))
    stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
    for i in range(n):
        img = np.full((40, 48, 3), 120, np.uint8)
        img[10:20, 12 + i:24 + i] = 20
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def decoded(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_frame_gets_the_still_frame_record_and_an_overlay_video(run, tmp_path, cli, one_torch_thread):
    clip = write_clip(tmp_path / "clip.mp4")
    res = cli("predict", f"checkpoint={run}", f"input={clip}", f"out={tmp_path / 'out'}", "video_overlay=true")
    assert res.returncode == 0, res.stderr
    lines = records(tmp_path / "out" / "clip.jsonl")
    assert [r["index"] for r in lines] == list(range(FRAMES)) and {r["status"] for r in lines} == {"ok"}
    assert [r["timestamp"] for r in lines] == pytest.approx([i / RATE for i in range(FRAMES)])
    predictor = load_run(run).predictor("cpu")
    for r, image in zip(lines, decoded(clip)):  # the record a still frame of the same pixels gets
        assert r["defect_score"] == pytest.approx(predictor(image)["score"], abs=1e-5)
        assert set(r) >= {"decision", "defects", "areas", "predicted_class"}
    summary = json.loads((tmp_path / "out" / "clip.summary.json").read_text())
    assert summary["frames"] == summary["ok"] == FRAMES and summary["dropped"] == summary["broken"] == 0
    assert summary["ended"] == "end of input" and summary["source"]["rate"] == RATE
    assert len(decoded(tmp_path / "out" / "clip_overlay.mp4")) == FRAMES


def test_realtime_drops_and_counts_what_inference_has_no_time_for(run, tmp_path, monkeypatch, cli,
                                                                   one_torch_thread):
    """Inference takes 0.25 s a frame, the clip runs at 10 frames/s: most frames are dropped, every frame has its
    line, and the dropped ones are listed and counted."""
    original = FinetuneRun.predictor

    def slow(self, device):
        inner = original(self, device)

        def call(image):
            time.sleep(0.25)
            return inner(image)
        return call
    monkeypatch.setattr(FinetuneRun, "predictor", slow)
    clip = write_clip(tmp_path / "clip.mp4", n=20)
    res = cli("predict", f"checkpoint={run}", f"input={clip}", f"out={tmp_path / 'rt'}", "realtime=true")
    assert res.returncode == 0, res.stderr
    lines = records(tmp_path / "rt" / "clip.jsonl")
    assert sorted(r["index"] for r in lines) == list(range(20))
    summary = json.loads((tmp_path / "rt" / "clip.summary.json").read_text())
    assert summary["dropped"] >= 8 and summary["ok"] + summary["dropped"] == 20 == summary["frames"]
    assert summary["dropped"] == sum(r["status"] == "dropped" for r in lines)


def test_broken_and_unopenable_input_is_reported_not_a_traceback(run, tmp_path, cli, one_torch_thread):
    """An MPEG-TS stream (as a camera's recorder writes) with zeros in its middle and its end cut off: the frames
    FFmpeg can still decode are predicted, the run ends at the cut with a summary. A cut MP4 (its index at the end
    is gone), a file that is no video and a missing file: one line each."""
    clip = write_clip(tmp_path / "clip.ts", n=30)
    data = bytearray(clip.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = bytes(400)
    cut = tmp_path / "cut.ts"
    cut.write_bytes(bytes(data[: len(data) * 3 // 4]))
    res = cli("predict", f"checkpoint={run}", f"input={cut}", f"out={tmp_path / 'cut'}")
    assert res.returncode == 0 and "Traceback" not in res.stderr
    summary = json.loads((tmp_path / "cut" / "cut.summary.json").read_text())
    assert 0 < summary["ok"] < 30 and summary["frames"] == len(records(tmp_path / "cut" / "cut.jsonl"))
    mp4 = write_clip(tmp_path / "clip.mp4", n=30)
    cut_mp4 = tmp_path / "cut.mp4"
    cut_mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size * 3 // 4])
    res = cli("predict", f"checkpoint={run}", f"input={cut_mp4}", f"out={tmp_path / 'cut-mp4'}")
    assert_cli_error(res, 1, f"input: {cut_mp4}: cannot open it as a video")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    res = cli("predict", f"checkpoint={run}", f"input={bad}", f"out={tmp_path / 'bad'}")
    assert_cli_error(res, 1, f"input: {bad}: cannot open it as a video")
    res = cli("predict", f"checkpoint={run}", f"input={tmp_path / 'gone.mp4'}", f"out={tmp_path / 'gone'}")
    assert_cli_error(res, 1, f"input: {tmp_path / 'gone.mp4'} does not exist")
