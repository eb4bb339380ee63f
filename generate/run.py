"""``synthvit generate``: render a dataset into ``out_dir``, resuming whatever an earlier run finished."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from generate.backends import create_backend
from generate.config import GenerateConfig
from generate.defects.fit import fit_defects
from generate.preview import write_preview
from generate.schema import INFO_FILE, iter_shard, make_info, read_info, shard_filename, verify_dataset, write_info
from generate.writer import WrittenShard, plan_shards, remove_stale_temporaries, write_shards
from synthvit.config import CONFIG_FILE, ConfigError, config_diff, dump_yaml, load_config, to_dict
from synthvit.io import SynthvitError, writable_dir
from synthvit.ranks import join
from synthvit.storage import Folder

log = logging.getLogger("synthvit.generate")

PREVIEW_FILE = "preview.png"
# Keys that change how a run goes, not what it writes: a resumed run may change them freely.
RUN_ONLY_KEYS = ("out_dir", "num_workers", "verify", "preview")
# The backend groups that only their own backend reads (defects.* is read by every backend, procedural.* by
# several: surfaces, gray_prob, backgrounds).
BACKEND_GROUPS = ("stylegan", "diffusion", "contours", "copypaste")


def _dataset_view(d: dict) -> dict:
    """Drop run-only keys and the groups of backends not in use (so adding a backend keeps old datasets resumable)."""
    d = {k: v for k, v in d.items() if k not in RUN_ONLY_KEYS}
    for group in BACKEND_GROUPS:
        if d.get("backend") != group:
            d.pop(group, None)
    return d


def dataset_config(cfg: GenerateConfig) -> dict:
    """The part of the config that determines the dataset's bytes (recorded in ``_info.json``)."""
    return _dataset_view(to_dict(cfg))


def _prepare_out_dir(out: Folder, cfg: GenerateConfig) -> None:
    """Create ``out`` (or reach its bucket) and prove it writable, or check that it holds an earlier run of the
    same dataset config (then we resume)."""
    if not out.remote:
        writable_dir(out.location, "out_dir")  # says why: a file, under a file, read-only
    out.check_writable()
    try:
        previous = out.read_text(CONFIG_FILE)
    except FileNotFoundError:
        previous = None
    if previous is not None:
        try:  # read with today's defaults: a key added since changes nothing
            old = to_dict(load_config(GenerateConfig, text=previous))
        except ConfigError:
            try:
                old = yaml.safe_load(previous) or {}
            except yaml.YAMLError:
                old = {}
        old = _dataset_view(old)
        diff = config_diff(old, dataset_config(cfg))
        if diff:
            raise SynthvitError(
                f"out_dir {out} holds a dataset made with a different config ({'; '.join(diff[:5])}); "
                f"use another out_dir, or delete it to start over")
        return
    names = out.names() if out.remote else {p.name for p in Path(out.location).iterdir()}
    foreign = sorted(n for n in names if not n.startswith("."))
    if foreign:
        raise SynthvitError(
            f"out_dir {out} is not empty and holds no synthvit dataset (found {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}); choose an empty or new folder")


def verify(out: Folder) -> Path | str:
    problems = verify_dataset(out)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SynthvitError(f"{len(problems)} problem(s) in {out}:\n  {shown}{more}\n"
                            f"re-run the generate command (with verify=false) to rewrite missing shards; "
                            f"delete corrupt ones first")
    info = read_info(out)
    log.info("verified %s: %d shards, %d samples match %s", out, len(info.shards), info.num_samples, INFO_FILE)
    return out.location if out.remote else Path(out.location)


def _preview(out: Folder, filenames: list[str], count: int, class_names: list[str]) -> str | None:
    if count == 0:
        return None
    samples = []
    for fname in filenames:
        with out.open(fname) as f:
            for sample in iter_shard(f):
                samples.append(sample)
                if len(samples) == count:
                    break
        if len(samples) == count:
            break
    with out.staging() as folder:
        out.upload(write_preview(folder / PREVIEW_FILE, samples, class_names), PREVIEW_FILE)
    return out.url(PREVIEW_FILE)


def _prepare(out: Folder, cfg: GenerateConfig) -> None:
    """Rank 0 only: check or create ``out``, remove an interrupted run's partial files, record the config.
    (An object store keeps no partial objects: an interrupted upload never becomes visible.)"""
    _prepare_out_dir(out, cfg)
    stale = [] if out.remote else remove_stale_temporaries(Path(out.location))
    if stale:
        log.info("removed %d partial file(s) of an interrupted run", len(stale))
    out.write_text(CONFIG_FILE, dump_yaml(cfg))


def run(cfg: GenerateConfig) -> Path | str:
    """Render the shards this rank owns (shard k belongs to rank k % world size); rank 0 then writes _info.json.
    ``out_dir`` is a local folder or an object-store URL (s3://, gs://); returns it (a Path when local).
    ``defects.fit`` is read first: the config recorded (and run) holds its numbers."""
    ranks = join()
    rank, world, barrier = ranks.rank, ranks.world, ranks.barrier
    if cfg.verify:
        return verify(Folder(cfg.out_dir)) if rank == 0 else cfg.out_dir
    cfg = fit_defects(cfg)
    out = Folder(cfg.out_dir, write=True)
    backend = create_backend(cfg.backend, cfg)
    backend.validate()  # its inputs (backgrounds) read whole, before any shard
    if rank == 0:
        _prepare(out, cfg)
    barrier()
    plan = plan_shards(cfg.num_samples, cfg.samples_per_shard)
    present = out.names()  # one listing, not a request per shard
    todo = [s for s in plan if shard_filename(cfg.name, s.index) not in present and s.index % world == rank]
    mine = sum(1 for s in plan if s.index % world == rank)
    if len(todo) < mine:
        log.info("resuming: %d of %d shards already written", mine - len(todo), mine)
    t0 = time.perf_counter()
    results = write_shards(cfg, todo, out, backend=backend) if todo else {}
    elapsed = time.perf_counter() - t0
    barrier()  # every rank's shards are on disk
    done = sum(s.num_samples for s in todo)
    rate = f" in {elapsed:.1f} s ({done / elapsed:.1f} samples/s)" if done else ""
    if rank == 0:
        shards = []
        for s in plan:  # shards of other ranks and of earlier runs are hashed from disk
            fname = shard_filename(cfg.name, s.index)
            shards.append(results.get(s.index) or WrittenShard(fname, s.num_samples, out.sha256(fname)))
        info = make_info(cfg.name, shards, backend.class_names, dataset_config(cfg), extra=backend.info)
        write_info(out, info)  # last: its presence marks the dataset complete
        preview = _preview(out, [shard.filename for shard in shards], cfg.preview, backend.class_names)
        log.info("%s: %d samples in %d shards (%d new samples%s)%s", out, cfg.num_samples, len(plan), done, rate,
                 f"; preview: {preview}" if preview else "")
    else:
        log.info("rank %d: %d new samples%s", rank, done, rate)
    barrier()
    ranks.finish()
    return out.location if out.remote else Path(out.location)
