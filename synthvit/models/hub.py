"""Public weights, the way timm gets them, and the record of where any model's weights came from.

A timm name with its tag (``vit_small_patch16_224.augreg_in21k_ft_in1k``; no tag: timm's default one) names a
``pretrained_cfg`` whose ``hf_hub_id`` is a Hugging Face repository (``timm/<name.tag>``). :func:`fetch_weights` gets
that repository's ``model.safetensors`` through ``huggingface_hub.hf_hub_download`` -- the hub when online, the local
cache (``HF_HOME``) with ``HF_HUB_OFFLINE=1`` -- before anything is loaded: a repository holding pickled weights only
is refused (safetensors only: unpickling can run code), and so is a model not cached while offline, with the command
that fetches it. timm then loads that file (``pretrained_cfg_overlay=dict(file=...)``: its position-embedding
resampling, input-conv adaptation and classifier replacement). :func:`weights_record` is the provenance every model
carries as ``weights_source`` and every export records.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm

from synthvit.config import ConfigError
from synthvit.io import SynthvitError, sha256_file

log = logging.getLogger("synthvit.models")
SAFE_WEIGHTS = "model.safetensors"
PICKLED_WEIGHTS = "pytorch_model.bin"


def weights_record(source: str, path: str | Path, revision: str | None = None, chain: list | None = None) -> dict:
    """The provenance of a model's initial weights: ``source`` (``hf-hub:timm/<repo>``, a file path or
    ``init:<export folder>``), the hub snapshot ``revision`` (None elsewhere), the weight ``file``'s name and sha256,
    and ``chain``: the provenance the init export recorded (where its own weights came from), if any."""
    return {"source": source, "revision": revision, "file": Path(path).name, "sha256": sha256_file(path),
            "chain": list(chain or [])}


def pretrained_cfg(name: str, key: str = "model"):
    """timm's pretrained config of ``name`` (tag included; None for an architecture without any); an unknown tag is
    a config error listing the architecture's tags."""
    from timm.models import get_pretrained_cfg, split_model_name_tag

    try:
        return get_pretrained_cfg(name)
    except RuntimeError:
        arch, tag = split_model_name_tag(name)
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(f"{key}: {name}: timm has no tag {tag!r} for {arch}; its tags: {', '.join(tags[:12])}"
                          f"{' ...' if len(tags) > 12 else ''} (timm.list_pretrained('{arch}.*'))") from None


@dataclass(frozen=True)
class HubWeights:
    """A hub repository's ``model.safetensors``, where ``hf_hub_download`` put it (the cache's snapshot file)."""
    repo_id: str
    path: Path

    @property
    def revision(self) -> str | None:
        """The snapshot's commit hash (``.../snapshots/<commit>/model.safetensors``)."""
        return self.path.parent.name if self.path.parent.parent.name == "snapshots" else None

    def record(self) -> dict:
        return weights_record(f"hf-hub:{self.repo_id}", self.path, self.revision)


def hub_repo(name: str, key: str = "model") -> tuple[str, str | None]:
    """(repository id, revision or None) of a timm name's tag on the Hugging Face hub; a one-line error where timm
    gets those weights elsewhere (a URL) or has none."""
    cfg = pretrained_cfg(name, key)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        where = f" (timm gets them from {cfg.url})" if cfg is not None and cfg.url else ""
        on_hub = [n for n in timm.list_pretrained(f"{name.split('.')[0]}.*")
                  if getattr(pretrained_cfg(n, key), "hf_hub_id", None)]
        raise SynthvitError(f"{key}: {name} has no weights on the Hugging Face hub{where}; synthvit loads public "
                            f"weights from the hub or its cache only: use a tag that has them"
                            f"{' (' + ', '.join(on_hub[:6]) + ')' if on_hub else ''}, or give weights=FILE "
                            f"(a .safetensors file)")
    repo_id, _, revision = hub_id.partition("@")
    return repo_id, revision or None


def fetch_weights(name: str, key: str = "model") -> HubWeights:
    """``model.safetensors`` of ``name``'s hub repository, downloaded or (offline) found in the Hugging Face cache;
    every way this can fail is one line naming the model and what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = hub_repo(name, key)
    try:
        path = hf_hub_download(repo_id, SAFE_WEIGHTS, revision=revision)
    except LocalEntryNotFoundError:  # offline (or the hub unreachable), and not in the cache
        _refuse_pickled(name, repo_id, revision, key, online=False)
        raise SynthvitError(_not_cached(name, repo_id, key)) from None
    except EntryNotFoundError:  # the hub answered: the repository has no model.safetensors
        _refuse_pickled(name, repo_id, revision, key, online=True)
        raise SynthvitError(f"{key}: {name}: the hub repository {repo_id} holds no {SAFE_WEIGHTS}; give "
                            f"weights=FILE (a .safetensors file) instead") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise SynthvitError(f"{key}: {name}: the hub has no repository {repo_id}"
                            f"{'@' + revision if revision else ''} (or it is gated: log in with `hf auth login`) "
                            f"({type(e).__name__})") from None
    except (HfHubHTTPError, OSError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SynthvitError(f"{key}: {name}: cannot download {repo_id}/{SAFE_WEIGHTS} ({why:.200}); "
                            f"{_fetch_command(repo_id)}") from None
    weights = HubWeights(repo_id, Path(path))
    log.info("%s: %s from %s (revision %s)", key, name, weights.path, weights.revision)
    return weights


def _refuse_pickled(name: str, repo_id: str, revision: str | None, key: str, online: bool) -> None:
    """A repository that holds ``pytorch_model.bin`` but no ``model.safetensors``: one error saying so."""
    if online:
        from huggingface_hub import file_exists

        try:
            pickled = file_exists(repo_id, PICKLED_WEIGHTS, revision=revision)
        except Exception:  # any answer but yes leaves the caller's own message
            pickled = False
    else:
        from huggingface_hub import try_to_load_from_cache

        pickled = isinstance(try_to_load_from_cache(repo_id, PICKLED_WEIGHTS, revision=revision), str)
    if pickled:
        raise SynthvitError(f"{key}: {name}: {repo_id} holds pickled weights only ({PICKLED_WEIGHTS}, no "
                            f"{SAFE_WEIGHTS}); synthvit loads safetensors only (unpickling can run code): use a tag "
                            f"whose repository has {SAFE_WEIGHTS}, or convert the file yourself and give "
                            f"weights=FILE.safetensors")


def _fetch_command(repo_id: str) -> str:
    """How to put a repository's weights into the Hugging Face cache (``hf`` is huggingface_hub >= 1.0's CLI)."""
    import huggingface_hub

    cli = "hf" if int(huggingface_hub.__version__.split(".")[0]) >= 1 else "huggingface-cli"
    return (f"fetch it where the hub is reachable with `{cli} download {repo_id} {SAFE_WEIGHTS} config.json` "
            f"(into that machine's HF_HOME; copy the folder here and set HF_HOME to it), or give weights=FILE")


def _not_cached(name: str, repo_id: str, key: str) -> str:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
    return (f"{key}: {name}: its public weights ({repo_id}/{SAFE_WEIGHTS}) are not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and {why}; {_fetch_command(repo_id)}")


def weights_comment(record: dict | None) -> str:
    """``record`` as a trailing YAML comment block for a run's ``config.yaml`` (the strict config loader reads
    past comments: the file still loads as the config); empty for random weights."""
    import yaml

    if not record:
        return ""
    body = yaml.safe_dump({"weights_source": record}, sort_keys=False).rstrip("\n").splitlines()
    return "\n".join(["## where the initial weights came from (written by synthvit; not a config key)",
                      *(f"# {line}" for line in body)]) + "\n"
