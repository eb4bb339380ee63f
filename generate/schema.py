"""THE shard contract between ``generate`` and every reader (pretrain, timm, HF datasets).

A dataset is a folder of WebDataset tar shards ``<name>-000000.tar ...`` plus ``_info.json`` in timm's
schema (``{"name", "splits": {"train": {"name", "num_samples", "filenames", "shard_lengths"}}}``) extended
with ``class_names``, the generator config and a ``sha256`` per shard (same order as ``filenames``).

Each sample (key: 8 digits, the global sample index) holds:

- ``jpg`` (or ``png`` when lossless is asked for): the image, grayscale (L) or RGB;
- ``mask.png``: uint8, same size as the image, 0 = background, k = defect class k (``class_names[k]``);
- ``cls``: ascii int, the image's main defect class (most mask pixels, ties to the lower id), 0 = defect-free;
- ``json``: metadata: backend, seed, index, surface, and each defect instance with class, bbox, pixel area.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from synthvit.data import Item, RealData, bytes_image, bytes_mask, register_format, why
from synthvit.io import SynthvitError, dumps_json
from synthvit.storage import Folder, StorageError

SCHEMA = "synthvit.shards/1"
INFO_FILE = "_info.json"
SPLIT = "train"
IMAGE_KEYS = ("jpg", "png")
MASK_KEY = "mask.png"
CLS_KEY = "cls"
META_KEY = "json"
BACKGROUND = "good"  # the name of class 0: defect-free background


def shard_filename(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def main_class(mask: np.ndarray, num_classes: int) -> int:
    """The image label derived from its mask: the class with most pixels (ties -> lower id), 0 if empty."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)
    counts[0] = 0
    return int(counts.argmax()) if counts.any() else 0


def main_class_of(defects: list[dict], num_classes: int) -> int:
    """:func:`main_class` from per-instance ``{"class", "area"}`` records (no pass over the mask)."""
    counts = np.zeros(num_classes, np.int64)
    for d in defects:
        counts[d["class"]] += d["area"]
    return int(counts.argmax()) if counts.any() else 0


@dataclass
class Sample:
    """One decoded sample: ``image`` (H, W) or (H, W, 3) uint8, ``mask`` (H, W) uint8, ``cls`` int, ``meta`` dict."""
    image: np.ndarray
    mask: np.ndarray
    cls: int
    meta: dict = field(default_factory=dict)


def encode_sample(index: int, sample: Sample, image_format: str = "jpg", jpeg_quality: int = 95) -> dict[str, Any]:
    """The tar members of one sample (bytes), ready for ``webdataset.TarWriter``."""
    image = Image.fromarray(sample.image)
    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buf, format="PNG", compress_level=1)
    mask_buf = io.BytesIO()
    Image.fromarray(sample.mask).save(mask_buf, format="PNG", compress_level=1)
    return {
        "__key__": sample_key(index),
        image_format: buf.getvalue(),
        MASK_KEY: mask_buf.getvalue(),
        CLS_KEY: str(int(sample.cls)).encode("ascii"),
        META_KEY: dumps_json(sample.meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }


def decode_sample(members: dict[str, bytes]) -> Sample:
    """Inverse of :func:`encode_sample` for one sample's raw members (keys without the leading dot)."""
    image_key = next((k for k in IMAGE_KEYS if k in members), None)
    missing = [k for k in (MASK_KEY, CLS_KEY, META_KEY) if k not in members] + ([] if image_key else ["jpg|png"])
    if missing:
        raise SynthvitError(f"sample {members.get('__key__', '?')} lacks {', '.join(missing)}; "
                            f"a synthvit sample holds jpg|png, {MASK_KEY}, {CLS_KEY} and {META_KEY}")
    with Image.open(io.BytesIO(members[image_key])) as im:
        image = np.asarray(im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB"))
    with Image.open(io.BytesIO(members[MASK_KEY])) as im:
        mask = np.asarray(im)
    return Sample(image, mask, int(members[CLS_KEY]), json.loads(members[META_KEY]))


TAR_BLOCK = 512


class _Prefixed(io.RawIOBase):
    """A read-once stream with bytes already read from it put back in front (for the tarfile fallback)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if not self.head:
            data = self.stream.read(len(buf))
        else:
            data, self.head = self.head[:len(buf)], self.head[len(buf):]
        buf[:len(data)] = data
        return len(data)


def _read_exact(stream, n: int, what: str) -> bytes:
    """``n`` bytes (a remote stream may return fewer per call); a short read is a truncated archive."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise tarfile.ReadError(f"unexpected end of data in {what}: {got} of {n} bytes")
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_block(stream) -> bytes:
    """The next 512-byte block (fewer bytes only at the end of the stream; a remote one may return less per call)."""
    block = stream.read(TAR_BLOCK)
    while block and len(block) < TAR_BLOCK:
        more = stream.read(TAR_BLOCK - len(block))
        if not more:
            break
        block += more
    return block


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes over 8 GiB)
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"bad {what} field {field!r} in a tar header") from None


def tar_members(stream):
    """``(name, bytes)`` of every regular file of a tar archive read front to back from a binary ``stream``.

    Python's ``tarfile`` costs ~75 us per member in pure-Python header parsing (about half of a pretraining worker's
    time on 64 px crops: BENCHMARKS.md); synthvit's shards are plain ustar (``generate.writer``), so this parses the
    512-byte headers directly: checksum verified, ustar prefix, PAX ``path`` records and GNU long names (shards of
    other writers) honoured, directories and links skipped. An archive that does not start with a ustar header
    (compressed, v7) is read by ``tarfile`` instead. A truncated or damaged archive raises ``tarfile.ReadError`` at
    the member it reaches -- after yielding every whole member before it, as ``tarfile`` does."""
    head = _read_block(stream)
    if any(head) and (len(head) < TAR_BLOCK or head[257:262] != b"ustar"):  # not plain ustar: tarfile reads it
        with tarfile.open(fileobj=io.BufferedReader(_Prefixed(head, stream)), mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    yield info.name, tar.extractfile(info).read()
        return
    long_name = None
    header = head
    while True:
        if len(header) < TAR_BLOCK:
            if header:
                raise tarfile.ReadError(f"unexpected end of data in a tar header: {len(header)} of 512 bytes")
            return  # no end-of-archive blocks: tolerated, as tarfile does
        if not any(header):
            return  # end of archive
        if header[257:262] != b"ustar":
            raise tarfile.ReadError("bad tar header (no ustar magic) after the previous member")
        stored = _octal(header[148:156], "checksum")
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise tarfile.ReadError("bad checksum in a tar header")
        size, kind = _octal(header[124:136], "size"), header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        data = _read_exact(stream, size, name.decode("utf-8", "replace")) if size else b""
        if size % TAR_BLOCK:
            _read_exact(stream, TAR_BLOCK - size % TAR_BLOCK, "padding")
        if kind == b"x":  # PAX extended header: "<len> key=value\n" records; only the path matters here
            for record in data.split(b"\n"):
                key, _, value = record.partition(b" ")[2].partition(b"=")
                if key == b"path":
                    long_name = value.decode("utf-8")
        elif kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind in (b"0", b"\0", b"7"):
            full = long_name or ((prefix + b"/" + name) if prefix else name).decode("utf-8")
            long_name = None
            yield full, data
        elif kind != b"g":  # directories, links, global headers: no file content
            long_name = None
        header = _read_block(stream)


def iter_members(path):
    """Raw members of each sample of one shard, in order: ``{"__key__": key, "jpg": bytes, ...}``.
    ``path``: a local file, or an open binary stream (read once, front to back: a remote object)."""
    members: dict[str, bytes] = {}
    key = None
    opened = open(path, "rb") if isinstance(path, (str, Path)) else contextlib.nullcontext(path)
    with opened as stream:
        for name, data in tar_members(stream):
            base = name.rsplit("/", 1)[-1]
            k, ext = base.split(".", 1)
            if key is not None and k != key:
                yield {"__key__": key, **members}
                members = {}
            key = k
            members[ext] = data
    if key is not None:
        yield {"__key__": key, **members}


def iter_shard(path):
    """Decoded samples of one shard, in order (a small reader for tests, previews and verification)."""
    for members in iter_members(path):
        yield decode_sample(members)


class ShardEntry(NamedTuple):
    """One shard of the manifest: its file name, sample count and sha256 (None in manifests without hashes)."""
    filename: str
    num_samples: int
    sha256: str | None = None


@dataclass(kw_only=True)
class DatasetInfo:
    """``_info.json``: the shard set's name, classes (0 = defect-free), resolved generator config and shards.
    ``extra``: the backend's own top-level records (e.g. ``backgrounds``), written after ``splits``."""
    name: str
    class_names: list[str]
    generator: dict = field(default_factory=dict)
    shards: list[ShardEntry] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    schema: str = SCHEMA

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        return int(sum(s.num_samples for s in self.shards))

    @property
    def filenames(self) -> list[str]:
        return [s.filename for s in self.shards]

    def real_ids(self) -> dict[str, set[str]]:
        """Real-data folder -> the ids of its images this set drew on (backgrounds, pasted defects): every backend
        record in ``extra`` that names a ``folder`` and lists ``ids`` (or ``real_ids``)."""
        out: dict[str, set[str]] = {}
        for record in self.extra.values():
            if isinstance(record, dict) and isinstance(record.get("folder"), str):
                ids = record.get("real_ids", record.get("ids"))
                if isinstance(ids, list):
                    out.setdefault(record["folder"], set()).update(map(str, ids))
        return out

    def to_json(self) -> dict:
        """The manifest as written: timm's ``name``/``splits`` schema with our keys (the same keys as ever)."""
        split = {"name": SPLIT, "num_samples": self.num_samples, "filenames": self.filenames,
                 "shard_lengths": [int(s.num_samples) for s in self.shards]}
        if all(s.sha256 is not None for s in self.shards):
            split["sha256"] = [s.sha256 for s in self.shards]
        return {"name": self.name, "schema": self.schema, "class_names": list(self.class_names),
                "num_classes": self.num_classes, "generator": self.generator, "splits": {SPLIT: split},
                **self.extra}

    @classmethod
    def from_json(cls, doc, where: str) -> DatasetInfo:
        """A manifest read back (any version this project wrote); errors name ``where`` and the key at fault."""
        if not isinstance(doc, dict):
            raise SynthvitError(f"{where}: not a synthvit shards manifest (a JSON object with name, class_names, "
                                f"splits), got {type(doc).__name__}")
        for key in ("name", "class_names", "splits"):
            if key not in doc:
                raise SynthvitError(f"{where} lacks the key {key!r}; expected {SCHEMA} (keys name, class_names, "
                                    f"splits)")
        names, split = doc["class_names"], doc["splits"].get(SPLIT) if isinstance(doc["splits"], dict) else None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise SynthvitError(f"{where}: class_names must be a list of names, got {str(names)[:60]}")
        if not isinstance(split, dict) or not all(k in split for k in ("filenames", "shard_lengths", "num_samples")):
            raise SynthvitError(f"{where}: splits.{SPLIT} must hold filenames, shard_lengths and num_samples")
        filenames, lengths, hashes = split["filenames"], split["shard_lengths"], split.get("sha256")
        if isinstance(filenames, list) and hashes is None:
            hashes = [None] * len(filenames)  # manifests written before shards were hashed
        if not (isinstance(filenames, list) and all(isinstance(f, str) for f in filenames)
                and isinstance(lengths, list) and isinstance(hashes, list)
                and len(lengths) == len(filenames) == len(hashes)
                and all(isinstance(n, int) and not isinstance(n, bool) for n in lengths)):
            raise SynthvitError(f"{where}: splits.{SPLIT} must hold a list of shard filenames and one "
                                f"shard_lengths count (and sha256) each, got {str(filenames)[:60]} and "
                                f"{str(lengths)[:60]}")
        known = {"name", "schema", "class_names", "num_classes", "generator", "splits"}
        return cls(name=str(doc["name"]), class_names=list(names), generator=doc.get("generator") or {},
                   shards=[ShardEntry(*s) for s in zip(filenames, lengths, hashes)], schema=doc.get("schema", SCHEMA),
                   extra={k: v for k, v in doc.items() if k not in known})


def make_info(name: str, shards: list[tuple[str, int, str]], class_names: list[str], generator: dict,
              extra: dict | None = None) -> DatasetInfo:
    """``shards``: (filename, num_samples, sha256) per shard, in shard order; ``extra``: the backend's records."""
    return DatasetInfo(name=name, class_names=list(class_names), generator=generator,
                       shards=[ShardEntry(f, int(n), h) for f, n, h in shards], extra=dict(extra or {}))


def write_info(out_dir: str | Path | Folder, info: DatasetInfo) -> str:
    """Write the manifest (atomically: a reader sees none or all of it); returns where."""
    folder = out_dir if isinstance(out_dir, Folder) else Folder(out_dir)
    folder.write_text(INFO_FILE, dumps_json(info.to_json(), indent=2) + "\n")
    return folder.url(INFO_FILE)


def read_info(data_dir: str | Path | Folder) -> DatasetInfo:
    """Load and check ``_info.json`` (local or remote); errors name the file and the key at fault."""
    folder = data_dir if isinstance(data_dir, Folder) else Folder(data_dir)
    path = f"{folder}/{INFO_FILE}" if folder.remote else Path(folder.location) / INFO_FILE
    if not folder.is_dir():
        raise SynthvitError(f"dataset folder {folder} does not exist")
    try:
        text = folder.read_text(INFO_FILE)
    except FileNotFoundError:
        raise SynthvitError(f"{path} is missing: {folder} is not a finished synthvit dataset (re-run "
                            f"`synthvit generate out_dir={folder}` to complete it)") from None
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SynthvitError(f"{path} is not valid JSON: {e}") from None
    return DatasetInfo.from_json(doc, str(path))


class _Hashing(io.RawIOBase):
    """Hashes what is read through it: one pass over a (remote) shard both checks its sha256 and decodes it."""

    def __init__(self, stream):
        super().__init__()
        self.stream, self.hash = stream, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.stream.read(len(b))
        b[:len(data)] = data
        self.hash.update(data)
        return len(data)

    def digest(self) -> str:
        while self.read(1 << 20):  # the tar's end-of-archive padding
            pass
        return self.hash.hexdigest()


def verify_dataset(data_dir: str | Path | Folder, deep: bool = True) -> list[str]:
    """Problems found (empty list: the dataset matches its manifest).

    Checks every shard exists with the recorded sha256; with ``deep``, also that each shard decodes
    into the recorded number of samples. Each shard is read once, local or remote.
    """
    folder = data_dir if isinstance(data_dir, Folder) else Folder(data_dir)
    present = folder.names()
    problems = []
    for fname, n, digest in read_info(folder).shards:
        if not (fname in present if present is not None else folder.exists(fname)):
            problems.append(f"{fname}: missing")
            continue
        count, error = None, None
        with folder.open(fname) as raw:
            stream = _Hashing(raw)
            if deep:
                try:
                    count = sum(1 for _ in iter_shard(io.BufferedReader(stream, 1 << 20)))
                except StorageError:
                    raise
                except (tarfile.TarError, OSError, ValueError, SynthvitError) as e:
                    error = e
            actual = stream.digest()
        if digest is not None and actual != digest:
            problems.append(f"{fname}: sha256 differs from the manifest (corrupt or modified)")
        elif error is not None:
            problems.append(f"{fname}: unreadable ({error})")
        elif count is not None and count != n:
            problems.append(f"{fname}: holds {count} samples, the manifest says {n}")
    return problems


# ------------------------------------------------------------------------------- shards as real data (format=shards)
def read_real_data(root: Path | str, problems: list[str]) -> RealData:
    """A shard set read as real data (``finetune data=``, ``procedural.backgrounds=``): a local folder or an
    object-store URL; every sample an :class:`~synthvit.data.Item` holding its encoded bytes in memory."""
    folder = Folder(root)
    manifest = f"{folder}/{INFO_FILE}"
    try:
        info = read_info(folder)
    except SynthvitError as e:
        problems.append(str(e))
        return RealData(root, "shards", [])
    except Exception as e:  # a JSON of the wrong shape: a list, a number, splits that are not a dict ...
        problems.append(f"{manifest}: not a synthvit shards manifest ({why(e)})")
        return RealData(root, "shards", [])
    items, names = [], info.class_names
    for filename, expected, _ in info.shards:
        try:
            with folder.open(filename) as stream:
                shard = list(iter_members(stream))
        except Exception as e:  # missing, truncated or not a tar; a member name without an extension ...
            problems.append(f"{filename}: unreadable shard ({why(e)})")
            continue
        items += [item for m in shard if (item := _real_item(folder, filename, m, names, problems))]
        if len(shard) != expected:
            problems.append(f"{filename}: holds {len(shard)} samples, {INFO_FILE} says {expected}")
    return RealData(root, "shards", items, ["background", *names[1:]], list(names))


def _real_item(folder: Folder, filename: str, m: dict, names: list[str], problems: list[str]) -> Item | None:
    where = f"{filename}#{m['__key__']}"
    image_key = next((k for k in IMAGE_KEYS if k in m), None)
    if image_key is None or MASK_KEY not in m or CLS_KEY not in m:
        problems.append(f"{where}: lacks jpg|png, {MASK_KEY} or {CLS_KEY}")
        return None
    try:
        cls = int(m[CLS_KEY])
    except ValueError:
        cls = -1
    if not 0 <= cls < len(names):
        problems.append(f"{where}: cls {m[CLS_KEY][:20]!r} is not a class id 0..{len(names) - 1}")
        return None
    return Item(m["__key__"], f"{folder.url(filename)}#{m['__key__']}", bytes_image(m[image_key]), names[cls],
                bytes_mask(m[MASK_KEY]))


register_format("shards", read_real_data, detect=lambda root: (root / INFO_FILE).is_file())
