"""``synthvit predict input=clip.mp4`` / ``input=rtsp://...``: a video file or a live stream through a predictor.

Frames are decoded with PyAV (FFmpeg; extra ``video``) in a reader thread and predicted in order. Every decoded frame
gets one JSON line in ``<out>/<name>.jsonl``: ``index``, ``timestamp`` (s, from the stream's presentation times),
``status`` (``ok``, ``dropped`` or ``broken``) and, for a predicted frame, ``defect_score``, the ``decision`` (rule,
threshold), ``defects`` (class, area, box of each defect region) and ``areas`` -- the records of still frames.
``video_overlay=true`` also writes ``<name>_overlay.mp4`` (the predicted frames with their masks drawn, at the
source's frame rate). ``<name>.summary.json`` holds the counts, the time taken and how the input ended.

``realtime=true`` keeps up with the source: a file is read at its own frame rate (a camera delivers at its own), the
reader keeps only the newest frame, and a frame that a newer one replaced before inference was free is ``dropped``
(counted, and listed). Without it every frame is predicted, however long it takes. A packet FFmpeg cannot decode is
one ``broken`` line and the rest goes on; a stream that ends or fails (a camera gone) ends the run with what it had,
its reason in the summary -- never a traceback.
"""
from __future__ import annotations

import importlib
import logging
import queue
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from finetune.evaluate import NonFiniteOutput
from synthvit.io import SynthvitError, atomic_write_text, dumps_json
from synthvit.models import ExportMeta
from synthvit.overlay import overlay
from synthvit.progress import progress_bar

log = logging.getLogger("synthvit.predict")

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".ts", ".mts", ".mpg", ".mpeg", ".wmv", ".flv")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "rtmps://", "srt://", "udp://", "tcp://", "http://", "https://")
OPEN_TIMEOUT_S = 10.0  # a stream that does not answer in this long is an error naming it


class VideoError(SynthvitError):
    pass


def is_video(spec: str) -> bool:
    """A video file (by its suffix) or a stream URL."""
    return spec.lower().startswith(STREAM_SCHEMES) or Path(spec).suffix.lower() in VIDEO_SUFFIXES


def output_name(spec: str) -> str:
    """``clip`` for ``clip.mp4``; a stream's host and path with anything but letters, digits, ``-`` and ``.`` as ``_``."""
    if spec.lower().startswith(STREAM_SCHEMES):
        return re.sub(r"[^A-Za-z0-9.-]+", "_", spec.split("://", 1)[1].split("@")[-1]).strip("_") or "stream"
    return Path(spec).stem


def _av():
    try:
        return importlib.import_module("av")
    except ImportError:
        raise VideoError("PyAV is not installed: pip install 'synthvit[video]' (or .[video] in a checkout) to read "
                         "video files and streams") from None


class Frame(NamedTuple):
    index: int
    timestamp: float | None
    image: np.ndarray | None  # None: broken (``error`` says why)
    error: str | None = None


def frames(spec: str, channels: int, realtime: bool = False) -> tuple[Iterator[Frame], dict]:
    """The decoded frames of a file or stream, and what is known of it (``rate``, ``frames``: 0 when unknown); a
    source that cannot be opened is a :class:`VideoError` naming it."""
    av = _av()
    stream_url = spec.lower().startswith(STREAM_SCHEMES)
    if not stream_url and not Path(spec).is_file():
        raise VideoError(f"input: {spec} does not exist")
    options = {"rtsp_transport": "tcp"} if spec.lower().startswith(("rtsp://", "rtsps://")) else {}
    try:
        container = av.open(spec, options=options, timeout=OPEN_TIMEOUT_S if stream_url else None)
    except Exception as e:  # av.error.FFmpegError and its many subclasses, OSError
        raise VideoError(f"input: {spec}: cannot open it as a video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"input: {spec} holds no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = float(stream.average_rate) if stream.average_rate else 0.0
    info = {"rate": rate, "frames": int(stream.frames or 0), "codec": stream.codec_context.name,
            "width": stream.codec_context.width, "height": stream.codec_context.height}
    fmt = "gray" if channels == 1 else "rgb24"

    def generate() -> Iterator[Frame]:
        index, start = 0, None
        packets = container.demux(stream)
        try:
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    return
                except Exception as e:  # the input failed under us (a camera gone, a cut file)
                    info["ended"] = f"the input failed: {e}"
                    return
                try:
                    decoded = packet.decode()
                except Exception as e:  # a corrupt packet: one broken frame, then the rest
                    yield Frame(index, _seconds(packet.pts, stream.time_base), None, f"cannot decode: {e}")
                    index += 1
                    continue
                for frame in decoded:
                    t = _seconds(frame.pts, stream.time_base)
                    if realtime and not stream_url and t is not None:  # a file played at its own rate
                        now = time.perf_counter()
                        start = now - t if start is None else start
                        if start + t > now:
                            time.sleep(start + t - now)
                    yield Frame(index, t, frame.to_ndarray(format=fmt))
                    index += 1
        finally:
            container.close()
    return generate(), info


def _seconds(pts, time_base) -> float | None:
    return None if pts is None else round(float(pts * time_base), 6)


class Latest:
    """A one-frame slot between the reader and inference (realtime): a newer frame replaces an older one, which is
    counted as dropped; or, without realtime, a small queue the reader waits on."""

    END = object()

    def __init__(self, realtime: bool):
        self.realtime = realtime
        self.q: queue.Queue = queue.Queue(maxsize=1 if realtime else 4)
        self.dropped: list[Frame] = []
        self.lock = threading.Lock()

    def put(self, item) -> None:
        if not self.realtime or item is self.END:
            self.q.put(item)
            return
        with self.lock:
            try:
                self.dropped.append(self.q.get_nowait())
            except queue.Empty:
                pass
            self.q.put_nowait(item)

    def get(self):
        return self.q.get()

    def take_dropped(self) -> list[Frame]:
        with self.lock:
            out, self.dropped = self.dropped, []
        return out


def predict_video(predictor, spec: str, out_dir: Path, meta: ExportMeta, rule, realtime: bool = False,
                  video_overlay: bool = False) -> dict:
    """Predict every frame of a video file or stream (see the module's docstring); the summary's counts."""
    from finetune.predict import regions  # (predict imports this module)

    name = output_name(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path, summary_path = out_dir / f"{name}.jsonl", out_dir / f"{name}.summary.json"
    source, info = frames(spec, meta.in_chans, realtime)
    slot = Latest(realtime)
    failure: list[BaseException] = []

    def read() -> None:
        try:
            for frame in source:
                slot.put(frame)
        except BaseException as e:  # handed to the consumer's summary
            failure.append(e)
        finally:
            slot.put(Latest.END)

    reader = threading.Thread(target=read, name="video-reader", daemon=True)
    counts = Counter(frames=0, ok=0, dropped=0, broken=0, failed=0)
    writer = _OverlayWriter(out_dir / f"{name}_overlay.mp4", info["rate"]) if video_overlay else None
    t0 = time.perf_counter()
    bar = progress_bar(total=info["frames"] or None, desc="predict", unit="frame")
    with bar, open(records_path, "w", encoding="utf-8") as stream:
        def line(record: dict) -> None:
            stream.write(dumps_json(record) + "\n")
            stream.flush()
            counts["frames"] += 1
            counts[record["status"]] += 1
            bar.update(1)

        reader.start()
        while True:
            item = slot.get()
            for old in slot.take_dropped():
                line({"index": old.index, "timestamp": old.timestamp, "status": "dropped"})
            if item is Latest.END:
                break
            if item.image is None:
                line({"index": item.index, "timestamp": item.timestamp, "status": "broken", "error": item.error})
                continue
            try:
                result = predictor(item.image)
            except NonFiniteOutput:
                line({"index": item.index, "timestamp": item.timestamp, "status": "failed",
                      "error": "non-finite model output (NaN or infinity): no defect score"})
                continue
            record = {"index": item.index, "timestamp": item.timestamp, "status": "ok",
                      "defect_score": round(result["score"], 6)}
            classes = None
            if "probs" in result:
                classes = rule.classes(result["probs"])
                record["decision"] = {"rule": rule.name, "threshold": rule.threshold}
                record["defects"] = regions(classes, meta.seg_classes)
                record["areas"] = {n: int((classes == k).sum()) for k, n in enumerate(meta.seg_classes) if k}
            if "cls_probs" in result:
                p = result["cls_probs"].tolist()
                record["predicted_class"] = meta.cls_classes[int(np.argmax(p))]
            line(record)
            if writer is not None:
                shown = item.image if classes is None else overlay(item.image, classes, len(meta.seg_classes))
                writer.write(shown)
        reader.join()
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - t0
    ended = info.get("ended") or (f"the reader failed: {failure[0]}" if failure else "end of input")
    summary = {"input": spec, "jsonl": records_path.name, **{k: int(v) for k, v in counts.items()},
               "seconds": round(seconds, 3), "frames_per_s": round(counts["ok"] / seconds, 3) if seconds else None,
               "realtime": realtime, "source": info, "ended": ended,
               "overlay": writer.path.name if writer is not None else None}
    summary["source"].pop("ended", None)
    atomic_write_text(summary_path, dumps_json(summary, indent=2) + "\n")
    log.info("predict: %s: %d frames, %d predicted, %d dropped, %d broken in %.1f s (%s) -> %s", spec,
             counts["frames"], counts["ok"], counts["dropped"], counts["broken"], seconds, ended, records_path)
    return summary


class _OverlayWriter:
    """The overlay video: H.264 (libx264) where FFmpeg has it, else MPEG-4 Part 2, at the source's frame rate."""

    def __init__(self, path: Path, rate: float):
        self.path, self.rate = path, rate or 25.0
        self.container = self.stream = None

    def write(self, image: np.ndarray) -> None:
        av = _av()
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        if self.container is None:
            from fractions import Fraction

            self.container = av.open(str(self.path), mode="w")
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self.stream = self.container.add_stream(codec, rate=Fraction(self.rate).limit_denominator(1001))
            self.stream.width, self.stream.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
            self.stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:self.stream.height, :self.stream.width]),
                                           format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
