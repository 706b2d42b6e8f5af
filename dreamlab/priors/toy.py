"""A 2-D Gaussian-mixture "diffusion model" whose score is known in closed form, for checking
how guidance rules behave (mode seeking, mode coverage, diversity) where the answer is known.

The "images" are 2-D points. The data distribution of a prompt is a Gaussian mixture
p0 = Σ_k π_k N(μ_k, s_k² I) under the builtin prior's DDPM noise schedule (diffusers
``DDPMScheduler``, 1000 steps, linear β 1e-4 .. 0.02), so the noised marginal is

    p_t = Σ_k π_k N(α_t μ_k, (α_t² s_k² + σ_t²) I),   α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t)

and the exact noise prediction is ε̂(x_t, t) = −σ_t ∇ log p_t(x_t)
= σ_t Σ_k r_k(x_t) (x_t − α_t μ_k) / (α_t² s_k² + σ_t²), with the responsibilities r_k a softmax of
log π_k − log(α_t² s_k² + σ_t²) − ‖x_t − α_t μ_k‖² / (2(α_t² s_k² + σ_t²)) (stable log-sum-exp),
evaluated in float64.

Model space and "renders":

* model space is ``[B, 2, 1, 1]`` (``latent_channels = 2``). ``encode_images`` takes renders
  ``[B, 3, H, W]`` in [0, 1] and returns the mean over H, W of the first two channels, mapped to
  the mixture's coordinates by x = (2 v − 1) · ``coord_scale`` (so pixel values [0, 1] cover
  [−coord_scale, coord_scale]); ``decode_latents`` is the inverse, padded with a zero third
  channel, as constant ``image_size`` x ``image_size`` images clamped to [0, 1].

Text conditioning (how embeddings map to distributions):

* ``encode_prompt`` returns ``[N, 1, 2]`` "one-hot" rows: ``[1, 0]`` (the *target* mixture, e.g.
  four well-separated modes) for any text whose stripped, lower-cased form is not in
  ``uncond_prompts`` (default: only ""), and ``[0, 1]`` (a *broad* single Gaussian N(m, b² I))
  for those. With dreamlab's defaults the conditional prompt and all its view variants are the
  target, and the negative / null prompt "" is the broad Gaussian, so CFG
  ε_∅ + s(ε_y − ε_∅) behaves like real CFG: it sharpens the target and pushes away from the
  broad "average image" (for s > 1 the guided density p_target^s p_broad^(1−s) is tilted
  outwards, like CFG's over-saturation).
* ``predict_eps`` is *linear in the embedding*, per sample: with e = mean over the L tokens of
  the embedding, ε̂ = e[0] · ε_target + e[1] · ε_broad. One-hot rows select a distribution;
  blends of one-hot rows (LucidDreamer's interpolated view prompts of one text) stay one-hot.

``self.unet`` is a tiny diffusers-shaped network (``ToyUNet``): ``unet(x_t, t,
encoder_hidden_states=..., class_labels=None).sample`` is the exact ε above plus a residual MLP
whose last layer is zero-initialised, so the frozen prior is exact. Its ``nn.Linear`` layers
(``TOY_LORA_TARGETS``) are what peft LoRA targets in VSD/ESD (pass them as
``lora_target_modules``); ``time_embedding.linear_2`` fixes the width of an extra class
embedding, added to the MLP's hidden input (``predict_eps_with_unet``'s ``extra_class_emb``,
through ``add_to_time_embedding``).

The module also has the particle harness the guidance toy tests and ``bench/plot_guidance_toy.py``
share: ``render_particles`` (particles -> constant renders), ``run_particles`` (Adam on the
particles with a guidance called exactly as the trainer calls it) and ``particle_metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamlab.priors.base import Prior, add_to_time_embedding

TOY_LORA_TARGETS: tuple[str, ...] = ("fc_in", "fc_text", "fc_hidden", "fc_out")
"""Names of the residual MLP's ``nn.Linear`` layers (peft ``target_modules`` for VSD/ESD)."""

DEFAULT_MEANS: tuple[tuple[float, float], ...] = (
    (0.5, 0.5), (-0.5, 0.5), (-0.5, -0.5), (0.5, -0.5)
)
DEFAULT_STDS: tuple[float, ...] = (0.08, 0.08, 0.08, 0.08)
DEFAULT_WEIGHTS: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class GaussianMixture:
    """Σ_k π_k N(μ_k, s_k² I) in 2-D (isotropic components)."""

    means: tuple[tuple[float, float], ...]
    stds: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        k = len(self.means)
        if k == 0 or len(self.stds) != k or len(self.weights) != k:
            raise ValueError(
                f"need as many stds and weights as means, got {k}, {len(self.stds)}, "
                f"{len(self.weights)}"
            )
        if any(len(m) != 2 for m in self.means):
            raise ValueError(f"means must be 2-D points, got {self.means}")
        if not all(s > 0 for s in self.stds) or not all(w > 0 for w in self.weights):
            raise ValueError("stds and weights must be > 0")

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(means [K, 2], stds [K], normalised log-weights [K]) in float64."""
        means = torch.tensor(self.means, dtype=torch.float64)
        stds = torch.tensor(self.stds, dtype=torch.float64)
        weights = torch.tensor(self.weights, dtype=torch.float64)
        return means, stds, (weights / weights.sum()).log()

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n samples [n, 2] (float32, CPU)."""
        means, stds, log_w = self.tensors()
        k = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (means[k] + stds[k, None] * noise).float()


def mixture_eps(
    x_t: Tensor, alpha: Tensor, sigma: Tensor, means: Tensor, stds: Tensor, log_w: Tensor
) -> Tensor:
    """Exact ε̂ = −σ_t ∇ log p_t(x_t) of the noised mixture, float64.

    Args:
        x_t: [B, 2]; alpha, sigma: [B]; means [K, 2], stds [K], log_w [K] (normalised).
    """
    x_t = x_t.double()
    alpha, sigma = alpha.double()[:, None], sigma.double()[:, None]
    var = alpha**2 * stds[None] ** 2 + sigma**2  # [B, K]
    diff = x_t[:, None, :] - alpha[:, :, None] * means[None]  # [B, K, 2]
    # log N(x_t; α μ_k, var_k I) up to a constant: −(d/2) log var − ‖diff‖²/(2 var), d = 2.
    logits = log_w[None] - torch.log(var) - diff.square().sum(-1) / (2.0 * var)
    resp = torch.softmax(logits, dim=-1)  # log-sum-exp stable
    return sigma * (resp[..., None] * diff / var[..., None]).sum(1)


@dataclass
class ToyUNetOutput:
    """What ``ToyUNet`` returns (like diffusers' ``UNet2DConditionOutput``)."""

    sample: Tensor  # [B, 2, 1, 1] ε̂


class ToyUNet(nn.Module):
    """diffusers-shaped denoiser of the toy: ``forward(sample [B, 2, 1, 1], timestep,
    encoder_hidden_states [B, L, 2], class_labels=None (ignored)) -> .sample``, equal to the
    exact mixture ε (linear in the embedding) plus a residual MLP whose last layer starts at 0.

    Residual: h = SiLU(fc_in(x_t) + fc_text(e) + time_embedding(time_proj(t)) [+ extra]),
    h = SiLU(fc_hidden(h)), r = fc_out(h). ``add_adapter`` (diffusers' ``PeftAdapterMixin``
    method, re-implemented with ``peft.inject_adapter_in_model``) lets VSD/ESD LoRA it.
    """

    def __init__(
        self,
        target: GaussianMixture,
        broad: GaussianMixture,
        alphas_cumprod: Tensor,
        hidden: int = 64,
        time_channels: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from types import SimpleNamespace

        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        # diffusers-like config (add_to_time_embedding reads class_embeddings_concat).
        self.config = SimpleNamespace(class_embeddings_concat=False, in_channels=2, sample_size=1)
        for name, mix in (("target", target), ("broad", broad)):
            means, stds, log_w = mix.tensors()
            self.register_buffer(f"{name}_means", means)
            self.register_buffer(f"{name}_stds", stds)
            self.register_buffer(f"{name}_log_w", log_w)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().double().clone())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embedding = TimestepEmbedding(time_channels, hidden)
            self.fc_in = nn.Linear(2, hidden)
            self.fc_text = nn.Linear(2, hidden)
            self.fc_hidden = nn.Linear(hidden, hidden)
            self.fc_out = nn.Linear(hidden, 2)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)
        self.requires_grad_(False)
        self._adapter_names: list[str] = []

    # -------------------------------------------------------------- diffusers/peft plumbing

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """Injects a peft adapter (e.g. ``LoraConfig``) into the matching layers, like diffusers."""
        from peft import inject_adapter_in_model

        if adapter_name in self._adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        inject_adapter_in_model(adapter_config, self, adapter_name)
        self._adapter_names.append(adapter_name)

    # -------------------------------------------------------------- the model

    def exact_eps(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """Exact ε̂ [B, 2, 1, 1] (fp32): e[0]·ε_target + e[1]·ε_broad, e = mean over tokens."""
        batch = x_t.shape[0]
        t = _timesteps(t, batch, x_t.device)
        abar = self.alphas_cumprod[t]
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        x = x_t.reshape(batch, 2)
        e = embeds.double().mean(dim=1)  # [B, 2]
        eps_target = mixture_eps(
            x, alpha, sigma, self.target_means, self.target_stds, self.target_log_w
        )
        eps_broad = mixture_eps(
            x, alpha, sigma, self.broad_means, self.broad_stds, self.broad_log_w
        )
        eps = e[:, 0:1] * eps_target + e[:, 1:2] * eps_broad
        return eps.float().view(batch, 2, 1, 1)

    def residual(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        batch = x_t.shape[0]
        t = _timesteps(t, batch, x_t.device)
        temb = self.time_embedding(self.time_proj(t).float())  # hooks may add an extra embedding
        h = self.fc_in(x_t.reshape(batch, 2).float()) + self.fc_text(embeds.float().mean(dim=1))
        h = h + temb
        h = F.silu(self.fc_hidden(F.silu(h)))
        return self.fc_out(h).view(batch, 2, 1, 1)

    def forward(
        self,
        sample: Tensor,
        timestep,
        encoder_hidden_states: Tensor,
        class_labels=None,
        return_dict: bool = True,
    ):
        eps = self.exact_eps(sample, timestep, encoder_hidden_states) + self.residual(
            sample, timestep, encoder_hidden_states
        )
        return ToyUNetOutput(sample=eps) if return_dict else (eps,)


def _timesteps(t, batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(t, device=device).long().reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


class GaussianMixturePrior(Prior):
    """The toy prior (module docstring): a 2-D Gaussian mixture with an exact ε̂.

    Args:
        means, stds, weights: the target mixture (default: 4 modes at (±0.5, ±0.5), std 0.08,
            weights 0.4 / 0.3 / 0.2 / 0.1).
        broad_mean, broad_std: the unconditional single Gaussian N(m, b² I) (default: m = the
            target mixture's mean, b = 0.6, a bit wider than the target's own spread of ~0.5).
        coord_scale: pixel value v ∈ [0, 1] ↔ coordinate (2 v − 1)·coord_scale.
        uncond_prompts: texts (stripped, lower-cased) that select the broad Gaussian.
        image_size: size of the images ``decode_latents`` returns.
        hidden: width of ``unet``'s residual MLP; seed: its random initialisation.
    """

    latent_channels = 2

    def __init__(
        self,
        means: Sequence[Sequence[float]] = DEFAULT_MEANS,
        stds: Sequence[float] = DEFAULT_STDS,
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        broad_mean: Sequence[float] | None = None,
        broad_std: float = 0.6,
        coord_scale: float = 1.0,
        uncond_prompts: Sequence[str] = ("",),
        image_size: int = 8,
        hidden: int = 64,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        from diffusers import DDPMScheduler

        self.image_size = image_size
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.coord_scale = float(coord_scale)
        self.uncond_prompts = tuple(p.strip().lower() for p in uncond_prompts)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02
        )
        self.target = GaussianMixture(
            tuple(tuple(float(v) for v in m) for m in means),
            tuple(float(s) for s in stds),
            tuple(float(w) for w in weights),
        )
        if broad_mean is None:
            target_means, _, log_w = self.target.tensors()
            broad_mean = (log_w.exp()[:, None] * target_means).sum(0).tolist()
        self.broad = GaussianMixture(
            (tuple(float(v) for v in broad_mean),), (float(broad_std),), (1.0,)
        )
        self.unet = ToyUNet(
            self.target, self.broad, self.scheduler.alphas_cumprod, hidden=hidden, seed=seed
        ).to(self.device)

    # ------------------------------------------------------------------ Prior interface

    def encode_prompt(self, texts: list[str]) -> Tensor:
        """[N, 1, 2]: [1, 0] selects the target mixture, [0, 1] (``uncond_prompts``) the broad
        Gaussian."""
        broad, target = [0.0, 1.0], [1.0, 0.0]
        rows = [broad if text.strip().lower() in self.uncond_prompts else target for text in texts]
        return torch.tensor(rows, dtype=torch.float32, device=self.device).view(len(texts), 1, 2)

    def encode_images(self, rgb: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 2, 1, 1]: (2·mean_{H,W}(rgb[:, :2]) − 1)·coord_scale."""
        v = rgb[:, :2].float().mean(dim=(2, 3), keepdim=True)
        return (2.0 * v - 1.0) * self.coord_scale

    def decode_latents(self, latents: Tensor) -> Tensor:
        """[B, 2, 1, 1] -> constant images [B, 3, image_size, image_size] (third channel 0)."""
        v = (latents.float().reshape(-1, 2) / self.coord_scale + 1.0) * 0.5
        rgb = torch.cat([v, torch.zeros_like(v[:, :1])], dim=1).clamp(0.0, 1.0)
        return rgb[:, :, None, None].expand(-1, 3, self.image_size, self.image_size).contiguous()

    def predict_eps(self, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """Exact ε̂ (closed form: ``unet`` without its residual, 0 for the frozen prior)."""
        with torch.no_grad():
            dev = self.device
            return self.unet.exact_eps(x_t.to(dev), t.to(dev), embeds.to(dev))

    def predict_eps_with_unet(
        self, unet, x_t: Tensor, t: Tensor, embeds: Tensor, extra_class_emb: Tensor | None = None
    ) -> Tensor:
        """ε̂ through ``unet`` (a trainable copy of ``self.unet``, e.g. VSD's LoRA copy); gradients
        flow. ``extra_class_emb`` [B, hidden] is added to the residual MLP's hidden input (the
        output of ``unet.time_embedding``); None adds nothing."""
        with add_to_time_embedding(unet, extra_class_emb):
            dev = self.device
            out = unet(x_t.to(dev), t.to(dev), encoder_hidden_states=embeds.to(dev))
            return out.sample.float()

    def parameters(self):
        return self.unet.parameters()

    # ------------------------------------------------------------------ helpers

    def to_pixels(self, points: Tensor) -> Tensor:
        """Mixture coordinates [..., 2] -> pixel values [..., 2] (inverse of the encoding)."""
        return (points / self.coord_scale + 1.0) * 0.5

    def to_points(self, pixels: Tensor) -> Tensor:
        """Pixel values [..., 2] -> mixture coordinates [..., 2]."""
        return (2.0 * pixels - 1.0) * self.coord_scale

    def mode_centres(self) -> Tensor:
        """Target means [K, 2] (float32)."""
        return torch.tensor(self.target.means, dtype=torch.float32)


# ---------------------------------------------------------------------- particle harness


def render_particles(pixels: Tensor, size: int = 4) -> Tensor:
    """Particles [N, 2] (pixel values) -> constant renders [N, size, size, 3] whose first two
    channels are the particle and the third 0 (differentiable)."""
    rgb = torch.cat([pixels, torch.zeros_like(pixels[:, :1])], dim=1)
    return rgb[:, None, None, :].expand(-1, size, size, 3)


def run_particles(
    guidance: Callable,
    prior: GaussianMixturePrior,
    init_points: Tensor,
    cams_for_step: Callable[[int], object],
    embeds,
    steps: int,
    lr: float,
    seed: int = 0,
    betas: tuple[float, float] = (0.9, 0.99),
    lr_floor: float = 0.02,
    views: int = 1,
    history_every: int = 0,
) -> tuple[Tensor, list[Tensor]]:
    """Optimises N particles (init_points [N, 2], mixture coordinates) with Adam under
    ``guidance(rgb, cams, embeds, progress, generator)`` exactly as the trainer calls it
    (loss.backward, step), progress = step / steps. The learning rate follows a cosine decay from
    ``lr`` to ``lr_floor · lr`` (pixel units: one unit is 2·coord_scale in mixture
    coordinates), so the final spread measures the method rather than Adam's step noise.
    Each particle is rendered ``views`` times per step (batch N·views, particle-major, like
    several views of one 3D model): its update sums that many independent draws of t and ε, so
    the guidance's variance does not swamp its mean. ``cams_for_step(step)`` returns N·views
    cameras. Returns (final points [N, 2], history of
    points every ``history_every`` steps, the first entry the initial points)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = prior.to_pixels(init_points.float()).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=lr, betas=betas)
    history = [init_points.detach().clone()]
    for step in range(steps):
        for group in optimizer.param_groups:  # cosine decay to lr_floor · lr
            cosine = 0.5 * (1.0 + math.cos(math.pi * step / steps))
            group["lr"] = lr * (lr_floor + (1.0 - lr_floor) * cosine)
        optimizer.zero_grad(set_to_none=True)
        rgb = render_particles(pixels.repeat_interleave(views, dim=0) if views > 1 else pixels)
        out = guidance(rgb, cams_for_step(step), embeds, step / steps, generator)
        out.loss.backward()
        optimizer.step()
        if history_every and (step + 1) % history_every == 0:
            history.append(prior.to_points(pixels.detach()).clone())
    return prior.to_points(pixels.detach()), history


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between point sets a [N, 2] and b [M, 2] (quantiles of b
    matched to N points), averaged over fixed random directions."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(projections, generator=g, dtype=torch.float64) * math.pi
    dirs = torch.stack([theta.cos(), theta.sin()], dim=1)  # [P, 2]
    pa = torch.sort(a.double() @ dirs.T, dim=0).values  # [N, P]
    pb = torch.sort(b.double() @ dirs.T, dim=0).values  # [M, P]
    q = (torch.arange(a.shape[0], dtype=torch.float64) + 0.5) / a.shape[0]
    idx = (q * b.shape[0]).long().clamp(max=b.shape[0] - 1)
    return float((pa - pb[idx]).square().mean().sqrt())


def particle_metrics(
    points: Tensor, prior: GaussianMixturePrior, reference: Tensor | None = None
) -> dict[str, float]:
    """Measured quantities of a particle set [N, 2] against the prior's target mixture.

    * ``occupancy_k``: fraction of particles whose nearest mode centre is k; ``occupancy_tv``:
      total-variation distance of that histogram to the mixture weights; ``modes_occupied``:
      modes with at least one particle; ``occupancy_entropy``: its entropy (nats; log 4 = 1.386
      for 4 equal modes).
    * ``spread_ratio``: RMS distance of particles to the mean of their mode's particles, over
      the expected RMS √2·s_k of a true sample (1 = right spread, 0 = collapsed onto points).
    * ``nn_dist``: mean distance to the nearest other particle (collapse -> 0);
      ``knn_entropy``: the Kozachenko-Leonenko nearest-neighbour estimate of the particle
      distribution's differential entropy (nats; collapse -> very negative).
    * ``mode_dist``: mean distance to the nearest mode centre; ``max_abs``: max |coordinate|.
    * ``swd``: sliced Wasserstein-2 distance to ``reference`` target samples (if given).
    """
    points = points.float()
    centres = prior.mode_centres()
    stds = torch.tensor(prior.target.stds)
    weights = torch.tensor(prior.target.weights)
    weights = weights / weights.sum()
    d = torch.cdist(points, centres)  # [N, K]
    nearest = d.argmin(dim=1)
    k = centres.shape[0]
    occ = torch.bincount(nearest, minlength=k).float() / points.shape[0]
    out: dict[str, float] = {f"occupancy_{i}": float(occ[i]) for i in range(k)}
    out["occupancy_tv"] = float(0.5 * (occ - weights).abs().sum())
    out["modes_occupied"] = float((occ > 0).sum())
    nz = occ[occ > 0]
    out["occupancy_entropy"] = float(-(nz * nz.log()).sum())
    sq, expected = 0.0, 0.0
    for i in range(k):
        members = points[nearest == i]
        if members.shape[0] == 0:
            continue
        sq += float((members - members.mean(0)).square().sum())
        expected += members.shape[0] * 2.0 * float(stds[i]) ** 2
    out["spread_ratio"] = math.sqrt(sq / expected)
    pd = torch.cdist(points, points) + torch.eye(points.shape[0]) * 1e9
    nn = pd.min(dim=1).values
    out["nn_dist"] = float(nn.mean())
    # Kozachenko-Leonenko (k = 1) entropy estimate in 2-D: ψ(N) − ψ(1) + log π + 2·mean log r_i.
    n = torch.tensor(float(points.shape[0]))
    digammas = torch.digamma(n) - torch.digamma(torch.tensor(1.0))
    mean_log_r = nn.clamp_min(1e-12).log().mean()
    out["knn_entropy"] = float(digammas + math.log(math.pi) + 2.0 * mean_log_r)
    out["mode_dist"] = float(d.min(dim=1).values.mean())
    out["max_abs"] = float(points.abs().max())
    if reference is not None:
        out["swd"] = sliced_wasserstein(points, reference)
    return out
