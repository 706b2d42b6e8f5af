"""One full SDS step (encode -> noise -> CFG UNet pass -> surrogate loss -> backward to the render).

Priors timed: the tiny random SD used in tests (architecture of SD, ~1 MB), and with
``--full-size`` the real Stable Diffusion 2.1-base UNet + VAE architecture built from config with
random weights (no download needed: compute cost does not depend on the weight values).

Usage: python bench/bench_sds_step.py [--full-size] [--repeats N]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import machine, time_ms
from dreamlab.cameras import CameraSamplerConfig, sample_orbit_cameras
from dreamlab.guidance.sds import SDSConfig
from dreamlab.priors.stable_diffusion import StableDiffusionPrior
from dreamlab.priors.testing import make_tiny_sd_components
from dreamlab.prompts import build_prompt_embeds


def sd21_base_components(device: torch.device | str | None = None):
    """SD 2.1-base shaped components with random weights (configs as published for that model).

    ``device``: where the UNet and VAE are created (random init of ~950M parameters is much
    faster on a GPU than on the CPU); None: the CPU.
    """
    import contextlib

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    tokenizer, text_encoder, _, _, _ = make_tiny_sd_components(max_length=77)
    where = torch.device(device) if device is not None else contextlib.nullcontext()
    with where:
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    # The text encoder stays tiny: prompts are encoded once per run, not per step. Its width is
    # projected to the UNet's 1024 channels by padding, which costs nothing measurable.
    return tokenizer, text_encoder, vae, unet, scheduler


class _WidenedPrior(StableDiffusionPrior):
    """Pads tiny text embeddings to the full UNet's cross-attention width (bench only)."""

    def encode_prompt(self, texts):
        emb = super().encode_prompt(texts)
        return torch.nn.functional.pad(emb, (0, 1024 - emb.shape[-1]))


def run(full_size: bool, repeats: int, render_res: int) -> list[str]:
    if full_size:
        prior = _WidenedPrior.from_components(*sd21_base_components())
        name = "SD 2.1-base architecture (random weights), 512 px / 64x64 latents"
    else:
        prior = StableDiffusionPrior.from_components(*make_tiny_sd_components())
        name = f"tiny random SD ({prior.image_size} px)"
    sds = SDSConfig().build(prior)
    embeds = build_prompt_embeds(prior, "a red cube")
    gen = torch.Generator().manual_seed(0)
    cams = sample_orbit_cameras(CameraSamplerConfig(), render_res, gen)
    image = torch.rand(1, render_res, render_res, 3, requires_grad=True)

    def step():
        image.grad = None
        out = sds(image, cams, embeds, 0.5, gen)
        out.loss.backward()

    median, best = time_ms(step, repeats=repeats, warmup=1)
    return [f"| {name} | {render_res} | {median:.0f} | {best:.0f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--render-res", type=int, default=128)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print("| prior | render px | median ms | min ms |")
    print("|---|---|---|---|")
    for line in run(False, args.repeats, args.render_res):
        print(line, flush=True)
    if args.full_size:
        for line in run(True, max(2, args.repeats // 5), args.render_res):
            print(line, flush=True)


if __name__ == "__main__":
    main()
