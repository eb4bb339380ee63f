"""The diffusion backend with tiny randomly initialised pipelines (as diffusers' own tests build them), saved to a
local folder and loaded through the backend's real path. No download anywhere."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")  # the CLIP text encoder; in the test extra

from conftest import tiny_overrides  # noqa: E402
from generate.backends import create_backend  # noqa: E402
from generate.backends.diffusion.backgrounds import FolderBackgrounds  # noqa: E402
from generate.backends.diffusion.loading import check_pipeline_folder  # noqa: E402
from generate.backends.diffusion.random_init import build_pipeline  # noqa: E402
from generate.backends.torch_util import sample_rng  # noqa: E402
from generate.config import GenerateConfig  # noqa: E402
from generate.run import run  # noqa: E402
from generate.schema import iter_shard, main_class, read_info, verify_dataset  # noqa: E402
from synthvit.config import ConfigError, load_config  # noqa: E402
from synthvit.io import SynthvitError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: build_pipeline(root / kind, kind) for kind in ("inpaint", "img2img", "unconditional")}


def df_config(weights, *extra, **kw):
    kw.setdefault("image_size", 64)
    over = tiny_overrides(kw.pop("out_dir", "unused"), backend="diffusion", **kw)
    return load_config(GenerateConfig, overrides=over + [f"diffusion.weights={weights}", "diffusion.steps=2",
                                                         "diffusion.batch_size=4", *extra])


def procedural_surface(index, size=64):
    cfg = load_config(GenerateConfig, overrides=[f"image_size={size}", "defects.defect_free_prob=1.0"])
    return create_backend("procedural", cfg).render(index).image


def test_inpaint_masks_are_the_inpainted_region_and_runs_repeat(pipelines):
    cfg = df_config(pipelines["inpaint"], "defects.classes=[stain,pit,chip]", "defects.defect_free_prob=0.5")
    first = create_backend("diffusion", cfg).render_batch(list(range(6)))
    again = create_backend("diffusion", cfg).render_batch(list(range(6)))
    kinds = set()
    for i, (s, t) in enumerate(zip(first, again)):
        assert np.array_equal(s.image, t.image) and np.array_equal(s.mask, t.mask)  # seeded per sample
        assert s.image.shape[:2] == (64, 64) == s.mask.shape and s.image.dtype == np.uint8
        assert s.cls == main_class(s.mask, 4) and len(set(np.unique(s.mask)) - {0}) <= 1  # one class per frame
        background = procedural_surface(i)
        changed = (background != s.image).reshape(64, 64, -1).any(-1)
        assert not changed[s.mask == 0].any()  # outside the mask: exactly the background
        if s.cls:
            assert changed[s.mask > 0].mean() > 0.5
            assert ["stain", "pit", "chip"][s.cls - 1] in s.meta["diffusion"]["prompt"]
            assert sum(d["area"] for d in s.meta["defects"]) == int((s.mask > 0).sum())
        kinds.add(bool(s.cls))
    assert kinds == {True, False}


def test_batched_and_single_renders_agree(pipelines):
    backend = create_backend("diffusion", df_config(pipelines["inpaint"], "defects.defect_free_prob=0"))
    batch = backend.render_batch([0, 1, 2, 3])
    for i, s in enumerate(batch):
        single = backend.render(i)
        assert np.array_equal(s.mask, single.mask)
        # Same per-sample generator; GEMM shapes differ with the batch, so only up to rounding on the CPU.
        assert np.abs(s.image.astype(int) - single.image.astype(int)).max() <= 2


def test_shards_from_diffusion(pipelines, tmp_path):
    out = run(df_config(pipelines["inpaint"], out_dir=tmp_path / "a", num_samples=8, samples_per_shard=4,
                        preview=2))
    assert verify_dataset(out) == []
    samples = [s for f in sorted(out.glob("*.tar")) for s in iter_shard(f)]
    assert [s.meta["index"] for s in samples] == list(range(8))
    assert all(s.meta["backend"] == "diffusion" and s.mask.shape == (64, 64) for s in samples)
    info = read_info(out)
    assert info.class_names[0] == "good" and info.generator["diffusion"]["steps"] == 2
    assert "stylegan" not in info.generator


def test_folder_backgrounds(pipelines, tmp_path):
    folder = tmp_path / "good"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(folder / "b.png")  # smaller: resized
    cfg = df_config(pipelines["inpaint"], f"diffusion.backgrounds={folder}", "defects.defect_free_prob=0")
    backend = create_backend("diffusion", cfg)
    backgrounds = FolderBackgrounds(folder, 64, 64)
    for i, s in enumerate(backend.render_batch([0, 1, 2, 3])):
        bg, meta = backgrounds(i, sample_rng(0, i)[0])
        assert s.meta["surface"]["id"] == meta["id"] and s.image.shape == bg.shape
        assert np.array_equal(s.image[s.mask == 0], bg[s.mask == 0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthvitError, match="holds no images"):
        FolderBackgrounds(tmp_path / "empty", 64, 64)


@pytest.mark.parametrize("kind", ["img2img", "unconditional"])
def test_surface_modes_then_procedural_defects(pipelines, kind):
    cfg = df_config(pipelines[kind], f"diffusion.mode={kind}", "diffusion.strength=0.8", image_size="64x48")
    a = create_backend("diffusion", cfg).render_batch([0, 1, 2])
    b = create_backend("diffusion", cfg).render_batch([0, 1, 2])
    for s, t in zip(a, b):
        assert np.array_equal(s.image, t.image) and np.array_equal(s.mask, t.mask)
        assert s.image.shape[:2] == (48, 64) and s.cls == main_class(s.mask, 8)
        assert s.meta["diffusion"]["mode"] == kind


def test_missing_weights_are_named(pipelines, tmp_path):
    with pytest.raises(SynthvitError, match="nowhere does not exist"):
        check_pipeline_folder(tmp_path / "nowhere")
    broken = shutil.copytree(pipelines["inpaint"], tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(SynthvitError) as e:
        create_backend("diffusion", df_config(broken))
    assert "unet/*.safetensors (found only pickled diffusion_pytorch_model.bin" in str(e.value)
    assert "scheduler/" in str(e.value)
    no_text = shutil.copytree(pipelines["inpaint"], tmp_path / "no_text")
    index = json.loads((no_text / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]
    (no_text / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SynthvitError, match="text_encoder"):  # diffusers or our check, both name it
        create_backend("diffusion", df_config(no_text))
    (broken / "model_index.json").unlink()
    with pytest.raises(SynthvitError, match="lacks model_index.json"):
        check_pipeline_folder(broken)


def test_config_errors():
    with pytest.raises(ConfigError, match="prompts"):
        load_config(GenerateConfig, overrides=["diffusion.prompts=[bubble=a bubble]"])
    with pytest.raises(ConfigError, match="multiple of 8"):
        create_backend("diffusion", df_config("unused", image_size=60))
    cfg = load_config(GenerateConfig, overrides=['diffusion.prompts=["crack=a hairline crack in {surface}"]'])
    assert cfg.diffusion.prompt_for("crack", "steel") == "a hairline crack in steel"
    assert cfg.diffusion.prompt_for("pit", "steel") == "a close-up photo of a pit defect on a steel surface"
