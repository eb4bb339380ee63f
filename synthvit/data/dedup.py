"""Near-duplicates across the split: a 64-bit perceptual hash (pHash) of every image, and the train/test pairs whose
hashes differ in at most a few bits -- one frame resized, re-encoded, shifted or re-lit on both sides of the split,
which leaks test content into training.

The hash is imagehash's ``phash`` (hash_size 8) written out in a few vectorised numpy/scipy lines instead of a new
dependency (imagehash would add itself and PyWavelets for one function): the frame in grayscale, resized to 32 x 32
(Lanczos), a 2-D DCT-II (``scipy.fft.dctn``, unnormalised like imagehash's ``fftpack.dct``), and its 8 x 8 lowest
frequencies compared with their median, one bit each, row by row, the first the most significant (so
``f"{h:016x}"`` reads like imagehash's string). Every frame's thumbnail goes through one batched DCT. The DC term
stays in the block, as in imagehash: its bit is set for any frame that is not black, so it never counts in a
distance. Two shortcuts for large frames, in the reading only: JPEGs decode at a reduced scale (Pillow's ``draft``,
still >= 128 px) and the resize box-reduces to >= 96 px before its Lanczos pass (``reducing_gap``).

Low frequencies survive resizing and JPEG re-encoding (<= 2 bits apart) and mostly a shift of 1-2 % of the frame
(~4 bits at 1 %); independent frames differ in about half their bits (32 +- 4), so :data:`MAX_DISTANCE` = 6 flags
copies and leaves different frames alone. Frames of one part under other light, or of one product in one fixture,
can come closer: a pair listed is a candidate to look at, not a verdict. The train x test comparison is an XOR and
a popcount over all pairs (row blocks of bounded memory): ~25 ms for 940 x 404 hashes.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np
from PIL import Image

from synthvit.data.core import DataError, Item, to_array, why

MAX_DISTANCE = 6  # Hamming distance (of 64 bits) up to which a train/test pair counts as a near-duplicate
SIDE, LOW = 32, 8  # the frame is resized to SIDE x SIDE; its LOW x LOW lowest DCT frequencies make the hash
METHOD = f"pHash ({LOW * LOW}-bit DCT hash of {SIDE}x{SIDE} grayscale, imagehash.phash's algorithm)"
_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], np.uint8)
_BLOCK = 1 << 22  # pairs compared at once (32 MB of uint64)


class NearDuplicate(NamedTuple):
    train: str
    test: str
    distance: int  # Hamming distance of the two hashes, in bits


def _small(image: Image.Image) -> np.ndarray:
    """The SIDE x SIDE grayscale float32 thumbnail a hash is taken of."""
    image.draft("L", (4 * SIDE, 4 * SIDE))  # JPEG: decode at 1/2..1/8 scale (still >= 128 px); others: no-op
    gray = Image.fromarray(to_array(image, channels=1))
    # reducing_gap: a box reduction to >= 3 x SIDE first, then Lanczos: 42 -> 8 ms from a 4K frame; on the 1,344
    # magnetic-tile frames 0.5 bit (at most 4) from a Lanczos resize alone, bits whose coefficients sit at the median
    return np.asarray(gray.resize((SIDE, SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0), dtype=np.float32)


def hash_thumbnails(thumbs: np.ndarray) -> np.ndarray:
    """uint64 hashes of a (N, SIDE, SIDE) stack of grayscale thumbnails, all at once."""
    from scipy.fft import dctn  # here: importing synthvit.data stays light (~0.25 s of scipy.fft)

    low = dctn(np.asarray(thumbs, np.float64), type=2, axes=(-2, -1))[..., :LOW, :LOW].reshape(len(thumbs), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def phash(image: Image.Image | np.ndarray) -> int:
    """The 64-bit perceptual hash of one image (a PIL image of any mode, or a uint8 (H, W) / (H, W, 3) array)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return int(hash_thumbnails(_small(image)[None])[0])


def hash_items(items: Iterable[Item], progress=None) -> dict[str, int]:
    """id -> 64-bit hash of each real-data item, read once; ``progress``: a bar updated per image. An image that
    cannot be read is a DataError naming it."""
    ids, thumbs = [], []
    for item in items:
        try:
            with item.load() as im:
                thumbs.append(_small(im))
        except Exception as e:  # noqa: BLE001  (any reader's failure is named with its file)
            raise DataError(f"{item.source}: cannot hash {item.id!r}: {why(e)}") from e
        ids.append(item.id)
        if progress is not None:
            progress.update(1)
    hashes = hash_thumbnails(np.stack(thumbs)) if thumbs else np.zeros(0, np.uint64)
    return dict(zip(ids, (int(h) for h in hashes)))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits in which each hash of ``a`` (N,) differs from each of ``b`` (M,): an (N, M) uint8 matrix."""
    x = np.asarray(a, np.uint64)[:, None] ^ np.asarray(b, np.uint64)[None, :]
    return _POPCOUNT[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def cross_split_pairs(hashes: dict[str, int], split: dict[str, str],
                      max_distance: int = MAX_DISTANCE) -> list[NearDuplicate]:
    """(train id, test id, distance) of every train/test pair of ``hashes`` within ``max_distance`` bits, nearest
    first, then by ids. Ids of ``hashes`` that ``split`` puts elsewhere (``unused``) or does not name are left out."""
    train = sorted(i for i in hashes if split.get(i) == "train")
    test = sorted(i for i in hashes if split.get(i) == "test")
    if not train or not test:
        return []
    a = np.array([hashes[i] for i in train], np.uint64)
    b = np.array([hashes[i] for i in test], np.uint64)
    rows = max(1, _BLOCK // len(b))
    found = []
    for start in range(0, len(a), rows):
        d = hamming(a[start:start + rows], b)
        r, c = np.nonzero(d <= max_distance)
        found += [NearDuplicate(train[start + i], test[j], int(d[i, j])) for i, j in zip(r.tolist(), c.tolist())]
    return sorted(found, key=lambda p: (p.distance, p.train, p.test))


def near_duplicates(items: list[Item], split: dict[str, str], max_distance: int = MAX_DISTANCE,
                    progress=None) -> list[NearDuplicate]:
    """:func:`cross_split_pairs` of ``items`` (each hashed once; only those ``split`` puts in train or test)."""
    hashes = hash_items([i for i in items if split.get(i.id) in ("train", "test")], progress)
    return cross_split_pairs(hashes, split, max_distance)


def pairs_text(pairs: list[NearDuplicate], shown: int = 10) -> str:
    """``train ~ test (d bits)`` of the first ``shown`` pairs, ``... and N more`` after them."""
    text = ", ".join(f"{p.train} ~ {p.test} ({p.distance} bit{'s' * (p.distance != 1)})" for p in pairs[:shown])
    return text + (f" and {len(pairs) - shown} more" if len(pairs) > shown else "")


def pairs_record(pairs: list[NearDuplicate], max_distance: int, n_train: int, n_test: int) -> dict:
    """What a run folder keeps of the check (JSON-ready)."""
    return {"method": METHOD, "max_distance": max_distance, "train_images": n_train, "test_images": n_test,
            "pairs": [p._asdict() for p in pairs]}
