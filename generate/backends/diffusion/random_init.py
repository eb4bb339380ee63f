"""Randomly initialised diffusers pipelines built from configs, saved as local folders: for tests, benchmarks and
smoke runs of the diffusion backend without any download (the images are noise-like; speed and shapes are real).

    python -m generate.backends.diffusion.random_init weights/tiny-inpaint --kind inpaint --size tiny

``tiny`` follows diffusers' own pipeline tests (UNet and VAE with 32/64 channels, a 5-layer CLIP text encoder of
width 32); ``sd15`` has Stable Diffusion 1.5's UNet and VAE shapes (860M + 84M parameters) with a one-layer text
encoder of width 768: the UNet and VAE dominate the speed, their weights do not.
The tokenizer is a byte-level CLIP BPE vocabulary without merges, written here (no download).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

UNET = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, cross_attention_dim=32,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=32),
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),  # the defaults are SD 1.5's
}
VAE = {
    "tiny": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=64),
    "sd15": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512),
}
TEXT = {"tiny": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5),
        "sd15": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=1)}


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(folder: str | Path) -> Path:
    """``vocab.json`` + ``merges.txt`` of a byte-level CLIP tokenizer (no merges: one token per character)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def text_parts(size: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:  # the tokenizer reads its files once, here
        tok_dir = write_tokenizer_files(d)
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            max_position_embeddings=77, **TEXT[size])
    return CLIPTextModel(config).eval(), tokenizer


def make_pipeline(kind: str = "inpaint", size: str = "tiny", seed: int = 0, device: str = "cpu"):
    """A random ``kind`` pipeline (inpaint, img2img or unconditional) of ``size``, built on ``device``."""
    import diffusers

    torch.manual_seed(seed)
    with torch.device(device):
        if kind == "unconditional":
            unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                         layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
            return diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
        unet = diffusers.UNet2DConditionModel(in_channels=9 if kind == "inpaint" else 4, out_channels=4, **UNET[size])
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, **VAE[size])
        text_encoder, tokenizer = text_parts(size)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cls = diffusers.StableDiffusionInpaintPipeline if kind == "inpaint" else diffusers.StableDiffusionImg2ImgPipeline
    return cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_pipeline(folder: str | Path, kind: str = "inpaint", size: str = "tiny", seed: int = 0) -> Path:
    """:func:`make_pipeline`, saved to ``folder`` (safetensors) as the diffusion backend loads it."""
    folder = Path(folder)
    make_pipeline(kind, size, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m generate.backends.diffusion.random_init", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output pipeline folder")
    ap.add_argument("--kind", choices=("inpaint", "img2img", "unconditional"), default="inpaint")
    ap.add_argument("--size", choices=tuple(UNET), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        folder = build_pipeline(args.out, args.kind, args.size, args.seed)
    except ModuleNotFoundError as e:
        if e.name not in ("diffusers", "transformers"):
            raise
        raise SystemExit(f"a diffusion pipeline needs {e.name}: pip install 'synthvit[diffusion]'") from None
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
