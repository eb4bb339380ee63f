import dataclasses
import shutil

import pytest
import torch

from pretrain.data import StreamSpec, batches_per_epoch, check_shard_counts, load_sources, make_loader
from synthvit.io import SynthvitError


def spec_for(folder, **kw) -> StreamSpec:
    sources, _ = load_sources([str(folder)], [], [])
    base = dict(sources=sources, batch_size=4, image_size=32, in_chans=3, scale=(0.3, 1.0), jitter=0.2,
                with_mask=True, seed=0, rank=0, world=1, workers=2, resample=True, shuffle_buffer=20,
                batches_per_epoch=batches_per_epoch(40, 4, 1, 2))
    base.update(kw)
    return StreamSpec(**base)


def take(spec, num_workers, n, in_process=False):
    it = iter(make_loader(spec, num_workers, in_process=in_process))
    return [next(it) for _ in range(n)]


def same(a, b):
    return a["keys"] == b["keys"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_batches_shapes_and_types(tiny_dataset):
    (b,) = take(spec_for(tiny_dataset), 0, 1)
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.uint8
    assert b["mask"].shape == (4, 32, 32) and b["cls"].dtype == torch.long
    (g,) = take(spec_for(tiny_dataset, in_chans=1, with_mask=False), 0, 1)
    assert g["image"].shape == (4, 1, 32, 32) and "mask" not in g


@pytest.mark.parametrize("start", [3, 9, 10, 17])  # 9, 17: a role has no batch left in its epoch
def test_stream_resumes_exactly_where_it_stopped(tiny_dataset, start):
    spec = spec_for(tiny_dataset)
    full = take(spec, 2, 24)
    resumed = take(dataclasses.replace(spec, start_batch=start), 2, 24 - start)
    assert all(same(a, b) for a, b in zip(full[start:], resumed))
    assert not same(full[0], full[1])


@pytest.mark.parametrize("start", [0, 9])
def test_roles_decoded_in_process_give_the_batches_of_worker_processes(tiny_dataset, start):
    """loader=main: the two roles of num_workers=2 in the training process -- the same batches, in the same order,
    as two DataLoader workers (also when resuming mid-epoch), so the choice never changes what is learnt."""
    spec = dataclasses.replace(spec_for(tiny_dataset), start_batch=start)
    workers, main = take(spec, 2, 12), take(spec, 2, 12, in_process=True)
    assert all(same(a, b) and a["skipped"] == b["skipped"] for a, b in zip(workers, main))
    assert len({tuple(b["keys"]) for b in main}) == 12
    one_role = take(dataclasses.replace(spec, workers=1, batches_per_epoch=batches_per_epoch(40, 4, 1, 1)), 0, 12)
    assert not all(same(a, b) for a, b in zip(one_role, main))  # the role count, not the process count, matters


def test_loader_auto_decodes_in_process_where_workers_would_share_the_compute_cores(monkeypatch):
    from synthvit import training as loop

    monkeypatch.setattr(loop, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert loop.resolve_loader("auto", 2, torch.device("cpu"), 1) == "main"  # 2 threads + 2 workers > 2 cores
    assert loop.resolve_loader("auto", 2, torch.device("cuda"), 1) == "workers"  # workers beside an accelerator
    assert loop.resolve_loader("workers", 2, torch.device("cpu"), 1) == "workers"
    assert loop.resolve_loader("auto", 0, torch.device("cpu"), 1) == "main"
    monkeypatch.setattr(loop, "usable_cores", lambda: 16)
    assert loop.resolve_loader("auto", 2, torch.device("cpu"), 1) == "workers"  # 2 + 2 <= 16
    assert loop.resolve_loader("auto", 2, torch.device("cpu"), 4) == "workers"  # 4 x (2 + 2) <= 16
    assert loop.resolve_loader("auto", 2, torch.device("cpu"), 5) == "main"  # 5 x (2 + 2) > 16


def test_ranks_read_disjoint_shards(tiny_dataset):
    spec = spec_for(tiny_dataset, world=2, workers=2, batches_per_epoch=batches_per_epoch(40, 4, 2, 2))
    shards = []
    for rank in (0, 1):
        keys = {k for b in take(dataclasses.replace(spec, rank=rank), 2, 8) for k in b["keys"]}
        shards.append({k.split("/")[0] for k in keys})
    assert shards[0] and shards[1] and not shards[0] & shards[1]


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])
def test_corrupt_shard_is_skipped_and_counted(tiny_dataset, tmp_path, cache_bytes):
    """A damaged shard is skipped and counted every epoch, with or without the sample cache (never kept in it)."""
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    victim = ds / "synthvit-000002.tar"
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated mid-sample
    spec = spec_for(ds, resample=False, workers=1, batches_per_epoch=8)  # 4 good shards: 8 batches of 4
    batches = take(dataclasses.replace(spec, cache_bytes=cache_bytes), 0, 24)
    skips = [b["skipped"][1] for b in batches]
    assert skips[0] >= 1 and skips[-1] >= skips[7] + 2  # counted again in every later pass
    assert {k.split("/")[0] for b in batches for k in b["keys"]} >= {"synthvit-000000.tar", "synthvit-000004.tar"}
    if cache_bytes:
        plain = take(spec, 0, 24)
        assert all(same(a, b) and a["skipped"] == b["skipped"] for a, b in zip(batches, plain))


def test_sample_cache_reads_and_decodes_each_sample_once_and_keeps_the_batches(tiny_dataset, monkeypatch):
    """cache_bytes: after the first epoch a role's shards come from memory, their images already decoded -- and the
    batches are those of the uncached stream, byte for byte (two roles in process, three epochs, masks). A budget
    too small for one shard caches nothing and changes nothing."""
    from PIL import Image

    from pretrain import data

    opens, converts = [], []
    real_open, real_convert = data.open_stream, Image.Image.convert
    monkeypatch.setattr(data, "open_stream", lambda url: opens.append(url) or real_open(url))
    monkeypatch.setattr(Image.Image, "convert", lambda im, *a, **k: converts.append(1) or real_convert(im, *a, **k))
    spec = spec_for(tiny_dataset)  # 40 samples in 5 shards, 2 roles: 10 batches of 4 an epoch
    runs = {}
    for budget in (0, 1 << 30, 1000):
        opens.clear(), converts.clear()
        runs[budget] = (take(dataclasses.replace(spec, cache_bytes=budget), 2, 30, in_process=True),
                        len(opens), len(converts))
    plain, cached, tiny = runs[0], runs[1 << 30], runs[1000]
    assert all(same(a, b) and a["skipped"] == b["skipped"] for a, b in zip(plain[0], cached[0]))
    assert all(same(a, b) for a, b in zip(plain[0], tiny[0]))
    assert plain[1] >= 15 and plain[2] >= 120  # 3 epochs: every sample decoded each time it is drawn
    # each sample decoded at most once; a shard opened again only where an epoch ended inside it (kept only whole)
    assert cached[1] <= 10 < plain[1] and cached[2] <= 40, cached[1:]
    assert tiny[1:] == plain[1:]


def test_bad_sources(tiny_dataset, tmp_path):
    with pytest.raises(SynthvitError, match="does not exist"):
        load_sources([str(tmp_path / "nope")], [], [])
    with pytest.raises(SynthvitError, match="_info.json is missing"):
        load_sources([str(tmp_path)], [], [])
    with pytest.raises(SynthvitError, match=r"class_names in the config \['good', 'rust'\] differ"):
        load_sources([str(tiny_dataset)], [], ["good", "rust"])
    sources, _ = load_sources([str(tiny_dataset)], [], [])
    with pytest.raises(SynthvitError, match="has 5 shard.* for 2 rank.* x 4 worker.*without resampling"):
        check_shard_counts(sources, world=2, workers=4, resample=False)
    check_shard_counts(sources, world=2, workers=4, resample=True)  # shared shards: a warning only


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_augment_keeps_mask_aligned(fmt):
    import io

    import numpy as np
    from PIL import Image

    from pretrain.data import augment

    rng = np.random.default_rng(0)
    mask = np.zeros((300, 400), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, 260), rng.integers(0, 360)
        mask[y:y + 40, x:x + 40] = 1
    buf = io.BytesIO()
    Image.fromarray(mask * 255).save(buf, format=fmt, quality=98)
    sources = []
    spec = StreamSpec(sources, 4, 64, 1, (0.05, 0.3), 0.0, True, 0, 0, 1, 1, True, 10, 1)
    for i in range(20):
        img, m, _ = augment(Image.open(io.BytesIO(buf.getvalue())), Image.fromarray(mask),
                            np.random.default_rng(i), spec)
        agree = ((img[0] > 127) == (m > 0)).mean()
        assert agree > 0.95, (i, agree)


def test_datasets_with_other_classes_mix_over_their_union(tiny_dataset, tmp_path):
    """Procedural (7 defect classes) + formula-driven contours (3 others): one class list, contour masks and labels
    mapped past the procedural ids, each batch's pixels still agreeing with its labels."""
    from conftest import tiny_overrides
    from generate.config import GenerateConfig
    from generate.run import run
    from generate.schema import read_info
    from synthvit.config import load_config

    contours = tmp_path / "contours"
    run(load_config(GenerateConfig, overrides=tiny_overrides(contours, backend="contours",
                                                             **{"contours.num_classes": 3})))
    ours, theirs = read_info(tiny_dataset).class_names, read_info(contours).class_names
    sources, names = load_sources([str(tiny_dataset), str(contours)], [1, 1], [])
    assert names == ours + theirs[1:] and sources[0].class_map == ()
    assert sources[1].class_map == (0, len(ours), len(ours) + 1, len(ours) + 2)
    spec = spec_for(tiny_dataset, sources=sources, batches_per_epoch=batches_per_epoch(80, 4, 1, 2))
    seen = set()
    for b in take(spec, 0, 12):
        for cls, mask in zip(b["cls"], b["mask"]):
            values = set(mask.unique().tolist()) - {0}
            contour = bool(values & {len(ours), len(ours) + 1, len(ours) + 2})
            # a sample's pixels come from one dataset: contour ids and procedural defect ids never mix
            assert not (contour and values & set(range(1, len(ours)))) and max(values | {int(cls)}) < len(names)
            assert not contour or int(cls) >= len(ours)  # its label (the whole frame's) mapped as its mask was
            seen.add("contour" if contour else "procedural")
    assert seen == {"contour", "procedural"}
    with pytest.raises(SynthvitError, match=r"class_names in the config"):
        load_sources([str(tiny_dataset), str(contours)], [], ours)
