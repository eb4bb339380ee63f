"""Tiled inference for frames far larger than a model's input (4K, 8K), with smooth blending of overlaps.

A :class:`Tiler` cuts a frame into ``tile``-sized windows overlapping by ``overlap`` (10 % by default), the last
row and column snapped to the frame's border, runs them through a model in batches and stitches the per-pixel
probabilities back into the full-resolution map. Overlaps are blended with a separable ramp window (weights fall
off linearly across the overlap band, never to zero), normalised so the weights at every pixel sum to one.

Memory stays bounded: the frame is kept in its own dtype (uint8 for images) and only one batch of tiles is
converted to float at a time; there is never a tensor holding all tiles. The normaliser is separable
(``row_sums[:, None] * col_sums[None, :]``), so no per-pixel weight map is stored either. Frames smaller than a
tile are zero-padded to the tile size and cropped back.

MONAI's ``sliding_window_inference`` solves the same problem for 3-D medical volumes; it materialises a full
importance map and pads the input, which is what ``benchmarks/bench_tiling.py`` compares against.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from synthvit import training

Predictor = Callable[[torch.Tensor], torch.Tensor]  # (B, C, th, tw) float -> (B, K, th, tw)


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of tiled inference for ``tiling.precision`` (None: fp32). ``auto`` takes bf16 on CUDA and
    on CPUs with native bf16, where it runs 1.4-1.7x faster than fp32 (BENCHMARKS.md), fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda" or (device.type == "cpu" and training.cpu_has_bf16()):
        return torch.bfloat16
    return None


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one axis: stride ``tile - round(tile * overlap)``, the last start snapped to the end."""
    if length <= tile:
        return [0]
    stride = max(1, tile - round(tile * overlap))
    starts = list(range(0, length - tile, stride))
    if not starts or starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def ramp_window(tile: int, ramp: int, floor: float = 1e-3) -> torch.Tensor:
    """1-D blending weights: linear from ``floor`` at the tile edge to 1 after ``ramp`` pixels, symmetric."""
    if ramp <= 0:
        return torch.ones(tile)
    i = torch.arange(tile, dtype=torch.float64)
    edge = torch.minimum(i + 0.5, tile - i - 0.5)
    return (edge / ramp).clamp(floor, 1.0).float()


def tile_streams(device: torch.device) -> int:
    """Streams for ``tiling.streams=0``: two on a CPU running two or more compute threads (each stream then half of
    them), one elsewhere -- a GPU, or a CPU process of one thread (a compare cell)."""
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


AUTO_BATCH_PIXELS = 1 << 19  # 0.5 Mpx: 32 tiles of 128 px, 8 of 256 or 512 (the floor)
MIN_AUTO_BATCH = 8


def auto_tile_batch(tile: int, attention: bool) -> int:
    """Tiles per batch for ``tiling.batch_size=0``: a model with attention blocks (a ViT, a hybrid) takes at least 8
    and as many as make 0.5 Mpx, others 8. Small tiles in batches of 8 leave a ViT's matmuls small on a CPU
    (ViT-Tiny at 128 px: 8 x 65 tokens) and pay the per-batch call overhead ~80 times a 4K frame: 32 of them ran
    ViT-Tiny 1.16x faster at two threads; a CNN's convolutions are large already, and DeepLabV3+ in batches of 32
    ran 0.75x in fp32 (BENCHMARKS.md). Tiles of 256 px and more keep 8, the memory they always had."""
    return max(MIN_AUTO_BATCH, AUTO_BATCH_PIXELS // (tile * tile)) if attention else MIN_AUTO_BATCH


@dataclass
class Tiler:
    tile: int = 512
    overlap: float = 0.1
    batch_size: int = 8

    def __post_init__(self):
        if self.tile < 8:
            raise ValueError(f"tile: {self.tile} is too small; use >= 8 px")
        if not 0.0 <= self.overlap < 0.5:
            raise ValueError(f"overlap: {self.overlap} must be in [0, 0.5)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size} must be >= 1")

    def grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """(y, x) of every tile, row by row (for a frame already padded to at least one tile)."""
        ys = tile_starts(height, self.tile, self.overlap)
        xs = tile_starts(width, self.tile, self.overlap)
        return [(y, x) for y in ys for x in xs]

    def _axis_weights(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tile window and the sum of all windows covering each position along one axis."""
        window = ramp_window(self.tile, round(self.tile * self.overlap)).to(device)
        total = torch.zeros(length, device=device)
        for s in tile_starts(length, self.tile, self.overlap):
            total[s:s + self.tile] += window
        return window, total

    def chunks(self, frame: torch.Tensor) -> list[list[tuple[int, int]]]:
        """The positions of each batch of tiles of a padded (C, H, W) frame."""
        positions = self.grid(frame.shape[-2], frame.shape[-1])
        return [positions[i:i + self.batch_size] for i in range(0, len(positions), self.batch_size)]

    def stack(self, frame: torch.Tensor, chunk: list[tuple[int, int]]) -> torch.Tensor:
        """The tiles at ``chunk`` as one float32 batch (B, C, tile, tile)."""
        return torch.stack([frame[:, y:y + self.tile, x:x + self.tile] for y, x in chunk]).float()

    def batches(self, frame: torch.Tensor) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        """Yield (positions, tiles (B, C, tile, tile) as float32) for a padded (C, H, W) frame."""
        for chunk in self.chunks(frame):
            yield chunk, self.stack(frame, chunk)

    @torch.no_grad()  # not inference_mode: autocast caches a weight's low-precision copy only outside it
    def __call__(self, frame: torch.Tensor, predict: Predictor, num_outputs: int,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 autocast_dtype: torch.dtype | None = None, streams: int = 1) -> torch.Tensor:
        """Blend ``predict`` over the tiles of ``frame`` (C, H, W), any dtype; returns (num_outputs, H, W) float32.

        ``transform`` maps a float tile batch to the model's input (e.g. normalisation), on the frame's device.
        ``autocast_dtype`` (e.g. torch.bfloat16 on GPU) runs the model under autocast. ``streams`` > 1 (a CPU):
        that many threads each run every ``streams``-th batch with an equal share of torch's compute threads, and
        the predictions are blended in batch order, as with one stream (see :meth:`_streamed`).
        """
        C, H, W = frame.shape
        pad_h, pad_w = max(0, self.tile - H), max(0, self.tile - W)
        if pad_h or pad_w:
            frame = F.pad(frame, (0, pad_w, 0, pad_h))
        Hp, Wp = frame.shape[-2:]
        win_y, sum_y = self._axis_weights(Hp, frame.device)
        win_x, sum_x = self._axis_weights(Wp, frame.device)
        window = win_y[:, None] * win_x[None, :]
        out = torch.zeros(num_outputs, Hp, Wp, device=frame.device)
        chunks = self.chunks(frame)

        def run(chunk_list):
            # one autocast region for all of a stream's batches, under no_grad: autocast keeps the low-precision
            # copy of each weight for as long as its region lasts (never under inference_mode), so the weights are
            # cast once per frame and stream, not once per layer call (that was ~9 % of a ViT-Tiny 4K frame on a CPU)
            with torch.no_grad(), torch.autocast(frame.device.type, dtype=autocast_dtype or torch.bfloat16,
                                                 enabled=autocast_dtype is not None):
                for chunk in chunk_list:
                    tiles = self.stack(frame, chunk)
                    yield predict(transform(tiles) if transform is not None else tiles).float() * window

        preds = run(chunks) if streams <= 1 or len(chunks) < 2 else self._streamed(run, chunks, streams)
        with contextlib.closing(preds):  # a stream's threads end, and torch's thread count returns, even on error
            for chunk, pred in zip(chunks, preds):
                for (y, x), p in zip(chunk, pred):
                    out[:, y:y + self.tile, x:x + self.tile] += p
        out /= sum_y[:, None] * sum_x[None, :]
        return out[:, :H, :W]

    @staticmethod
    def _streamed(run, chunks: list, streams: int) -> Iterator[torch.Tensor]:
        """The predictions of ``run`` over ``chunks``, in order, computed by ``streams`` threads: thread k runs chunks
        k, k + streams, ... with ``torch.get_num_threads() // streams`` compute threads (torch's ops release the
        GIL). On a CPU two one-thread streams overlap what one two-thread stream runs serially (Python, pooling,
        the blend): DeepLabV3+ on a 4K frame at two threads 1.59x -> 1.80x the fp32 path (BENCHMARKS.md). Each
        stream holds at most two batches ahead; an error in one is raised here."""
        streams = min(streams, len(chunks))
        threads = torch.get_num_threads()
        stop = threading.Event()
        queues = [queue.Queue(maxsize=2) for _ in range(streams)]

        def put(k: int, item) -> bool:
            while not stop.is_set():
                try:
                    queues[k].put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work(k: int) -> None:
            try:
                for pred in run(chunks[k::streams]):
                    if not put(k, pred):
                        return
            except BaseException as e:  # handed to the consumer, raised there
                put(k, e)

        torch.set_num_threads(max(1, threads // streams))
        workers = [threading.Thread(target=work, args=(k,), name=f"tiler-stream-{k}", daemon=True)
                   for k in range(streams)]
        try:
            for w in workers:
                w.start()
            for i in range(len(chunks)):
                pred = queues[i % streams].get()
                if isinstance(pred, BaseException):
                    raise pred
                yield pred
        finally:
            stop.set()
            for q in queues:  # unblock a producer waiting on a full queue
                while not q.empty():
                    q.get_nowait()
            for w in workers:
                w.join()
            torch.set_num_threads(threads)

    def num_tiles(self, height: int, width: int) -> int:
        return len(tile_starts(max(height, self.tile), self.tile, self.overlap)) * len(
            tile_starts(max(width, self.tile), self.tile, self.overlap))
