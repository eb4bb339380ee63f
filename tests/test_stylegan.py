"""The StyleGAN backend: random-weight and checkpoint modes, batching, masks, shards, and the pickle converter."""
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from generate.backends import create_backend
from generate.backends.stylegan import load_checkpoint
from generate.backends.stylegan.convert import convert
from generate.backends.stylegan.convert import main as convert_main
from generate.backends.stylegan.network import Generator
from generate.config import GenerateConfig
from generate.run import run
from generate.schema import iter_shard, main_class, read_info, verify_dataset
from synthvit.config import ConfigError, load_config
from synthvit.io import SynthvitError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sg_config(*extra, **kw):
    over = tiny_overrides(kw.pop("out_dir", "unused"), backend="stylegan", **kw)
    return load_config(GenerateConfig, overrides=over + list(extra))


@pytest.mark.parametrize("mode,size", [("random", 48), ("oriented", "64x40")])
def test_batches_equal_single_samples_and_masks_are_changed_pixels(mode, size):
    cfg = sg_config(f"stylegan.mode={mode}", "stylegan.batch_size=4", "stylegan.anomaly_prob=0.4", image_size=size)
    backend = create_backend("stylegan", cfg)
    assert backend.class_names[-1] == "anomaly" and len(backend.class_names) == 9
    batch = backend.render_batch(list(range(6)))
    w, h = cfg.size
    clean = create_backend("stylegan", sg_config(f"stylegan.mode={mode}", "stylegan.anomaly_prob=0.4",
                                                 "defects.defect_free_prob=1.0", image_size=size))
    classes = set()
    for i, s in enumerate(batch):
        single = backend.render(i)
        assert np.array_equal(s.image, single.image) and np.array_equal(s.mask, single.mask)
        assert s.image.shape[:2] == (h, w) == s.mask.shape and s.image.dtype == np.uint8
        assert s.cls == main_class(s.mask, 9) and s.meta["index"] == i
        surface = clean.render(i).image
        changed = (surface != s.image).reshape(h, w, -1).any(-1)
        assert not changed[s.mask == 0].any()  # outside the mask: the StyleGAN surface, untouched
        if s.mask.any():
            assert changed[s.mask > 0].mean() > 0.5
        classes |= set(np.unique(s.mask).tolist())
    assert len(classes) > 2
    assert len({s.image.tobytes() for s in batch}) == 6  # every sample its own weight configuration


def test_generate_shards_any_shard_and_batch_size(tmp_path):
    a = run(sg_config("stylegan.batch_size=3", out_dir=tmp_path / "a", num_samples=12, samples_per_shard=5))
    b = run(sg_config("stylegan.batch_size=4", out_dir=tmp_path / "b", num_samples=12, samples_per_shard=8,
                      num_workers=2))
    assert verify_dataset(a) == [] and verify_dataset(b) == []

    def samples(folder):
        return {s.meta["index"]: (s.image.tobytes(), s.mask.tobytes(), s.cls)
                for f in sorted(folder.glob("*.tar")) for s in iter_shard(f)}
    assert samples(a) == samples(b) and len(samples(a)) == 12
    info = read_info(a)
    assert info.generator["backend"] == "stylegan" and "stylegan" in info.generator
    assert "diffusion" not in info.generator


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    G = Generator(z_dim=16, w_dim=16, resolution=32, img_channels=1, channel_base=256, channel_max=16,
                  mapping_layers=2)
    G.init_kwargs = dict(z_dim=16, c_dim=0, w_dim=16, img_resolution=32, img_channels=1,
                         mapping_kwargs=dict(num_layers=2), synthesis_kwargs=dict(channel_base=256, channel_max=16))
    return G


def test_converter_needs_trust_pickle_then_checkpoint_mode_renders(tmp_path, capsys):
    G = tiny_generator()
    pkl = tmp_path / "snapshot.pkl"
    pkl.write_bytes(pickle.dumps({"G_ema": G, "D": None}))
    out = tmp_path / "g.safetensors"
    with pytest.raises(SynthvitError, match="--trust-pickle"):
        convert(pkl, out)
    assert convert_main([str(pkl), str(out)]) == 1 and "--trust-pickle" in capsys.readouterr().err
    assert not out.exists()
    assert convert_main(["--trust-pickle", str(pkl), str(out)]) == 0
    loaded = load_checkpoint(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in G.state_dict().items())

    cfg = sg_config("stylegan.mode=checkpoint", f"stylegan.checkpoint={out}", image_size=40)
    backend = create_backend("stylegan", cfg)
    s = backend.render(3)
    assert s.image.shape == (40, 40) and s.meta["surface"]["family"] == "stylegan-checkpoint"
    assert np.array_equal(s.image, create_backend("stylegan", cfg).render(3).image)


def test_converter_reads_nvidia_persistent_pickles_without_running_their_code(tmp_path, monkeypatch):
    """stylegan2-ada-pytorch pickles embed class source (torch_utils.persistence); the converter must not run it."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("embedded code ran")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Persistent:
        def __init__(self, meta):
            self.meta = meta

        def __reduce__(self):
            return _reconstruct_persistent_obj, (self.meta,)

    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):  # dnnlib's attribute dict: NVIDIA's init_kwargs are these
        pass
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict

    def easy(d):
        return EasyDict({k: easy(v) if isinstance(v, dict) else v for k, v in d.items()})

    def wrap(module, init_kwargs=None):
        state = {"_parameters": dict(module._parameters), "_buffers": dict(module._buffers),
                 "_modules": {k: wrap(c) for k, c in module._modules.items()}, "init_kwargs": init_kwargs}
        return Persistent({"type": "class", "module_src": "raise SystemExit('ran')", "state": state})

    G = tiny_generator(1)
    fake = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
            "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    data = pickle.dumps({"G_ema": wrap(G, easy(G.init_kwargs)), "augment_pipe": wrap(torch.nn.Identity())})
    for name in fake:
        monkeypatch.delitem(sys.modules, name)
    (tmp_path / "n.pkl").write_bytes(data)
    loaded = load_checkpoint(convert(tmp_path / "n.pkl", tmp_path / "n.safetensors", trust_pickle=True))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in G.state_dict().items())


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="stylegan.checkpoint"):
        sg_config("stylegan.mode=checkpoint")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(SynthvitError, match="nope.safetensors does not exist"):
        create_backend("stylegan", sg_config("stylegan.mode=checkpoint", f"stylegan.checkpoint={missing}"))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SynthvitError, match="not a synthvit StyleGAN2 file"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_corrupt_pickle_and_checkpoint_are_named_in_clear_errors(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(SynthvitError, match="bad.pkl is not a readable pickle"):
        convert(bad, tmp_path / "out.safetensors", trust_pickle=True)
    with pytest.raises(SynthvitError, match="bad.pkl is not a readable .safetensors file"):
        load_checkpoint(bad)
