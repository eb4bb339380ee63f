"""Convert an NVIDIA stylegan2(-ada)-pytorch ``.pkl`` into the safetensors file the StyleGAN backend loads.

    python -m generate.backends.stylegan.convert --trust-pickle network-snapshot.pkl weights/surfaces.safetensors

A pickle can run arbitrary code when it is loaded, so this runs only with ``--trust-pickle``: use it on files you
made yourself or got from a source you trust. The classes that NVIDIA's pickles embed as source code
(``torch_utils.persistence``) are NOT executed: they are replaced by inert stubs that only keep the stored
state, from which the ``G_ema`` tensors and its ``init_kwargs`` are read. Tensors are written with safetensors,
which never executes code when loading.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import torch

from generate.backends.stylegan import FORMAT, load_checkpoint
from synthvit.io import SynthvitError, atomic_write_bytes


class _Inert(dict):
    """Stands for any class from ``torch_utils``/``dnnlib``/``training``: keeps the pickled state and items (a
    ``dnnlib.EasyDict`` of ``init_kwargs`` is a dict), runs nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}


def _persistent(meta):
    obj = _Inert()
    obj.state = meta.get("state", {}) if isinstance(meta, dict) else {}
    return obj


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
            return _persistent
        if module.split(".")[0] in ("torch_utils", "dnnlib", "training"):
            return _Inert
        return super().find_class(module, name)


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """``state_dict``-style names -> tensors, from an nn.Module or an inert stub of one."""
    if isinstance(obj, torch.nn.Module):
        return {prefix + k: v for k, v in obj.state_dict().items()}
    state = getattr(obj, "state", {})
    out = {}
    for group in ("_parameters", "_buffers"):
        for k, v in (state.get(group) or {}).items():
            if v is not None:
                out[prefix + k] = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    for k, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(_tensors(child, f"{prefix}{k}."))
    return out


def generator_config(kwargs: dict) -> dict:
    """Our :class:`Generator` arguments from stylegan2-ada-pytorch's ``G.init_kwargs``."""
    if kwargs.get("c_dim", 0):
        raise SynthvitError(f"conditional generators (c_dim={kwargs['c_dim']}) are not supported; "
                            f"train with --cond=0")
    mapping = kwargs.get("mapping_kwargs") or {}
    synthesis = kwargs.get("synthesis_kwargs") or {}
    if synthesis.get("architecture", "skip") != "skip":
        raise SynthvitError(f"synthesis architecture {synthesis['architecture']!r} is not supported; only 'skip' "
                            f"(StyleGAN2 config F, the stylegan2-ada-pytorch default)")
    return dict(z_dim=int(kwargs.get("z_dim", 512)), w_dim=int(kwargs.get("w_dim", 512)),
                resolution=int(kwargs["img_resolution"]), img_channels=int(kwargs.get("img_channels", 3)),
                channel_base=int(synthesis.get("channel_base", 32768)),
                channel_max=int(synthesis.get("channel_max", 512)),
                mapping_layers=int(mapping.get("num_layers", 8)))


def convert(src: str | Path, dst: str | Path, trust_pickle: bool = False) -> Path:
    if not trust_pickle:
        raise SynthvitError(f"refusing to unpickle {src}: pickles can execute code. Re-run with --trust-pickle "
                            f"only if you trust where the file comes from")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise SynthvitError(f"{src} does not exist")
    try:
        with open(src, "rb") as f:
            data = _Unpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as e:
        raise SynthvitError(f"{src} is not a readable pickle ({type(e).__name__}: {e}); expected a "
                            f"stylegan2(-ada)-pytorch network snapshot (.pkl)") from None
    G = data.get("G_ema") if isinstance(data, dict) else None
    if G is None:
        raise SynthvitError(f"{src} holds no 'G_ema' (keys: {sorted(data)[:8] if isinstance(data, dict) else '-'}); "
                            f"expected a stylegan2(-ada)-pytorch network snapshot")
    kwargs = G.state.get("init_kwargs") if isinstance(G, _Inert) else getattr(G, "init_kwargs", None)
    kwargs = {**kwargs, **getattr(kwargs, "state", {})} if isinstance(kwargs, dict) else kwargs
    if not isinstance(kwargs, dict) or "img_resolution" not in kwargs:
        raise SynthvitError(f"{src}: G_ema has no init_kwargs with img_resolution; cannot rebuild the network")
    from safetensors.torch import save

    tensors = {k: v.float().contiguous() for k, v in _tensors(G).items()}
    meta = {"format": FORMAT, "config": json.dumps(generator_config(kwargs)), "source": src.name}
    atomic_write_bytes(dst, save(tensors, metadata=meta))
    load_checkpoint(dst)  # the written file must load: names and shapes match the config
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m generate.backends.stylegan.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="stylegan2(-ada)-pytorch network snapshot (.pkl)")
    ap.add_argument("dst", help="output .safetensors file")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="allow unpickling SRC (pickles can execute code; only for files you trust)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.src, args.dst, trust_pickle=args.trust_pickle)
    except SynthvitError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
