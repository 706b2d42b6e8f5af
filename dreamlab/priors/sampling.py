"""Plain DDIM sampling (Song et al. 2021) with classifier-free guidance, over the Prior interface.

Used to judge a prior on its own (``dreamlab.bench.prior_quality``): draw images for a prompt and
compare them with the ground truth. Works for any :class:`~dreamlab.priors.base.Prior` — the
builtin pixel-space prior and Stable Diffusion alike — through ``encode_prompt``,
``predict_eps``, ``decode_latents`` and the prior's own noise schedule: the sampler is diffusers'
``DDIMScheduler`` built from ``prior.scheduler.config`` (never a hand-written schedule).

CFG follows the project convention (docs/guidance.md): ε̂ = ε_∅ + s (ε_y − ε_∅), where ε_∅ is the
negative prompt's prediction ("" by default, the true null).

x0 clipping: at every step the predicted clean image x̂0 is clipped to [-1, 1] before the DDIM
update (diffusers' ``clip_sample``). For a pixel-space prior this matters a lot: the builtin-prior
feasibility run measured nearest-ground-truth prompt accuracy 12 % without it and 33 % with it.
Latent priors (more than 3 channels, e.g. SD's 4-channel VAE latents, which are not bounded by 1)
are never clipped.

Early stop: once the timestep reaches ``stop_at_t`` (default 100 of 1000) the sampler returns the
step's predicted clean image x̂0 instead of taking the last low-noise steps. Those steps only add
fine grain, and they are where a small prior trained with min-SNR weighting (which spends least
on them) is least accurate: on the builtin prior, nearest-ground-truth prompt accuracy rose from
0.713 to 0.738 at CFG 1 (docs/builtin-prior.md). ``stop_at_t=0`` runs every step.

All randomness (initial noise, and the per-step noise when ``eta > 0``) is drawn from the given
CPU ``torch.Generator`` and then moved to the prior's device, so results do not depend on the
device's RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreamlab.priors.base import Prior


def is_pixel_prior(prior: Prior) -> bool:
    """True for a prior that denoises RGB pixels directly (3 model channels, no VAE)."""
    return int(prior.latent_channels) == 3 and not hasattr(prior, "vae")


def make_ddim_scheduler(prior: Prior, clip_x0: bool):
    """A fresh diffusers ``DDIMScheduler`` carrying ``prior``'s training noise schedule.

    ``predict_eps`` always returns ε (v-prediction priors convert), so the sampler is built for
    ε-prediction whatever the checkpoint's own ``prediction_type`` is.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        prior.scheduler.config,
        prediction_type="epsilon",
        clip_sample=bool(clip_x0),
        clip_sample_range=1.0,
        thresholding=False,
    )


def latent_size(prior: Prior) -> int:
    """Side of the model-space tensor: ``image_size`` for a pixel prior, / VAE factor otherwise."""
    return int(prior.image_size) // int(getattr(prior, "vae_scale_factor", 1))


@torch.no_grad()
def ddim_sample(
    prior: Prior,
    prompts: list[str],
    generator: torch.Generator,
    num_steps: int = 50,
    guidance_scale: float = 1.25,
    negative_prompt: str = "",
    clip_x0: bool = True,
    eta: float = 0.0,
    stop_at_t: int = 100,
    base_prompts: list[str] | None = None,
    view_guidance_scale: float = 0.0,
    other_view_prompts: list[list[str]] | None = None,
    other_view_scale: float = 0.0,
) -> Tensor:
    """Samples one image per prompt with DDIM and classifier-free guidance.

    Args:
        prior: any Prior (pixel-space or latent).
        prompts: B prompt strings (repeat a prompt to get several samples of it).
        generator: CPU generator all noise is drawn from (seed it for reproducible samples).
        num_steps: DDIM steps (the schedule's ``timestep_spacing`` decides which timesteps).
        guidance_scale: CFG scale s; 1 = plain conditional sampling, 0 = unconditional.
        negative_prompt: text of the "unconditional" CFG branch ("" = the true null).
        clip_x0: clip the predicted x0 to [-1, 1] each step (pixel-space priors only).
        eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like ancestral noise).
        stop_at_t: return the predicted x̂0 at the first timestep <= this (0: run every step).
        base_prompts: per prompt, the same prompt without its view phrase ("a house" for
            "a house, side view"); needed when ``view_guidance_scale`` > 0.
        view_guidance_scale: w of a separate guidance term for the view phrase (composable
            classifier-free guidance, Liu et al. 2022, "Compositional Visual Generation with
            Composable Diffusion Models"): ε̂ = ε_∅ + s(ε_y − ε_∅) + w(ε_y − ε_base). It pushes
            the sample towards what the view phrase adds to the prompt without raising the
            object's own scale s, which breaks this prior's shapes above ~1.3. 0 = off (the
            third UNet branch is not run).
        other_view_prompts: per prompt, the same K >= 1 prompts with the *other* view phrases
            ("a house, front view" and "a house, back view" for "a house, side view"); needed
            when ``other_view_scale`` > 0.
        other_view_scale: u of composable guidance's negation (Liu et al. 2022, the "NOT"
            operator) applied to the other views, relative to the base prompt:
            ε̂ += −u · mean_k(ε_{other_k} − ε_base). It steers away from what the other view
            phrases would add, the 2-D use of view negatives that Perp-Neg (Armandpour et al.
            2023) starts from. 0 = off (the K extra branches are not run).
    Returns:
        [B, 3, S, S] images in [0, 1] on the CPU, S = ``prior.image_size``.
    """
    if isinstance(prompts, str):
        raise TypeError("ddim_sample takes a list of prompts, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("ddim_sample needs at least one prompt")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if stop_at_t < 0:
        raise ValueError(f"stop_at_t must be >= 0, got {stop_at_t}")
    if view_guidance_scale < 0:
        raise ValueError(f"view_guidance_scale must be >= 0, got {view_guidance_scale}")
    if view_guidance_scale > 0 and (base_prompts is None or len(base_prompts) != len(prompts)):
        raise ValueError("view guidance needs one base prompt (without the view phrase) per prompt")
    if other_view_scale < 0:
        raise ValueError(f"other_view_scale must be >= 0, got {other_view_scale}")
    if other_view_scale > 0:
        if base_prompts is None or len(base_prompts) != len(prompts):
            raise ValueError("other-view negation needs one base prompt (without the view phrase) per prompt")
        if other_view_prompts is None or len(other_view_prompts) != len(prompts):
            raise ValueError("other-view negation needs a list of other-view prompts per prompt")
        counts = {len(others) for others in other_view_prompts}
        if len(counts) != 1 or 0 in counts:
            raise ValueError("every prompt needs the same number (>= 1) of other-view prompts")
    assert generator.device.type == "cpu", "ddim_sample draws its noise from a CPU generator"

    device = prior.device
    batch = len(prompts)
    scheduler = make_ddim_scheduler(prior, clip_x0 and is_pixel_prior(prior))
    scheduler.set_timesteps(num_steps, device="cpu")

    cond = prior.encode_prompt(prompts).to(device)  # [B, L, D]
    uncond = prior.encode_prompt([negative_prompt]).to(device).expand(batch, -1, -1)  # [B, L, D]
    embeds = torch.cat([uncond, cond])  # [2B, L, D]
    branches = 2
    needs_base = view_guidance_scale > 0 or other_view_scale > 0
    if needs_base:
        base = prior.encode_prompt(list(base_prompts)).to(device)  # [B, L, D]
        embeds = torch.cat([embeds, base])  # [3B, L, D]
        branches = 3
    num_others = 0
    if other_view_scale > 0:
        num_others = len(other_view_prompts[0])
        for k in range(num_others):  # block k: the k-th other view of every prompt
            others = prior.encode_prompt([row[k] for row in other_view_prompts]).to(device)
            embeds = torch.cat([embeds, others])
        branches += num_others

    size = latent_size(prior)
    shape = (batch, int(prior.latent_channels), size, size)
    x = torch.randn(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    x = x.to(device)
    for t in scheduler.timesteps:
        t_batch = torch.full((branches * batch,), int(t), dtype=torch.long, device=device)
        eps_all = prior.predict_eps(torch.cat([x] * branches), t_batch, embeds).float()
        eps_uncond, eps_cond = eps_all[:batch], eps_all[batch : 2 * batch]
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        if needs_base:
            eps_base = eps_all[2 * batch : 3 * batch]
            if view_guidance_scale > 0:
                eps = eps + view_guidance_scale * (eps_cond - eps_base)
            if num_others:
                eps_others = eps_all[3 * batch :].reshape(num_others, batch, *eps_base.shape[1:])
                eps = eps - other_view_scale * (eps_others - eps_base).mean(dim=0)
        noise = None
        if eta > 0:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        step = scheduler.step(eps, t, x, eta=eta, variance_noise=noise)
        if int(t) <= stop_at_t:
            x = step.pred_original_sample  # x̂0 (clipped when clip_x0)
            break
        x = step.prev_sample
    images = prior.decode_latents(x).float().clamp(0.0, 1.0)
    return images.cpu()
