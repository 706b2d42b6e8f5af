"""View-dependent prompting (DreamFusion; threestudio ``prompt_processors/base.py``).

* ``build_prompt_embeds`` encodes ``"{p}, {view} view"`` for every view in ``VIEW_NAMES`` plus
  the plain prompt, the negative prompt and the empty prompt, once per run (the prior caches).
* ``view_direction_index`` applies threestudio's discrete rules (spec §1.1): side by default,
  then front, back, overhead, later matches overwriting earlier ones.
* ``embeds_for_cameras`` picks per-camera (cond, uncond) embeddings: discrete views,
  LucidDreamer's linear interpolation front↔side↔back, or the plain prompt.
* ``perp_neg_embeds_for_cameras`` gives Perp-Neg's per-camera positive embedding, its two
  negative embeddings and their weights (threestudio ``get_text_embeddings_perp_neg``, spec §1.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from dreamlab.types import VIEW_NAMES, Cameras, PromptEmbeds, wrap_azimuth

if TYPE_CHECKING:  # dreamlab.guidance imports this module: no runtime import back
    from dreamlab.guidance.common import PerpNegWeights

ViewMode = Literal["discrete", "interpolated", "none"]
VIEW_MODES: tuple[str, ...] = ("discrete", "interpolated", "none")

FRONT, SIDE, BACK, OVERHEAD = (VIEW_NAMES.index(v) for v in ("front", "side", "back", "overhead"))


@dataclass
class PromptConfig:
    """How the prompt is turned into per-camera text embeddings."""

    negative_prompt: str = ""
    """Negative prompt: the "unconditional" branch of classifier-free guidance ("" = true null)."""
    view_dependent: ViewMode = "discrete"
    """View words: "discrete" ("{p}, front view" etc. by threestudio's angle rules),
    "interpolated" (LucidDreamer: blend front/side/back embeddings by azimuth), "none" (plain)."""
    front_threshold: float = 45.0
    """Half-width in degrees of the azimuth wedge called "front" (ProlificDreamer uses 30)."""
    back_threshold: float = 45.0
    """Half-width in degrees of the azimuth wedge called "back" (ProlificDreamer uses 30)."""
    overhead_threshold: float = 60.0
    """Elevation in degrees above which a view is "overhead" (discrete mode only)."""

    def validate(self) -> None:
        if self.view_dependent not in VIEW_MODES:
            raise ValueError(f"view_dependent must be one of {VIEW_MODES}, got {self.view_dependent!r}")
        for name in ("front_threshold", "back_threshold"):
            if not 0.0 <= getattr(self, name) <= 180.0:
                raise ValueError(f"{name} must lie in [0, 180] degrees, got {getattr(self, name)}")

    def embeds_for_cameras(
        self, embeds: PromptEmbeds, cams: Cameras, mode: ViewMode | None = None
    ) -> tuple[Tensor, Tensor]:
        """``embeds_for_cameras`` with this config's thresholds (and mode unless given)."""
        return embeds_for_cameras(
            embeds,
            cams,
            mode or self.view_dependent,
            front_threshold=self.front_threshold,
            back_threshold=self.back_threshold,
            overhead_threshold=self.overhead_threshold,
        )

    def perp_neg_embeds_for_cameras(
        self, embeds: PromptEmbeds, cams: Cameras, weights: PerpNegWeights
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``perp_neg_embeds_for_cameras`` with this config's overhead threshold (the front and
        back thresholds play no part in Perp-Neg, as in threestudio)."""
        return perp_neg_embeds_for_cameras(embeds, cams, weights, overhead_threshold=self.overhead_threshold)


def view_prompt(prompt: str, view: str) -> str:
    """The view-augmented prompt, threestudio's default template ``"{p}, {view} view"``."""
    return f"{prompt}, {view} view"


def _check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt is empty ({prompt!r}): describe the object to generate, e.g. 'a red chair'")
    return prompt.strip()


def build_prompt_embeds(prior, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
    """Encodes the prompt, its view variants, the negative prompt and "" with ``prior``.

    Raises:
        ValueError: the prompt is empty or whitespace only.
    """
    prompt = _check_prompt(prompt)
    texts = [prompt, *(view_prompt(prompt, v) for v in VIEW_NAMES), negative_prompt, ""]
    emb = prior.encode_prompt(texts)  # [len(VIEW_NAMES) + 3, L, D]
    n = len(VIEW_NAMES)
    return PromptEmbeds(
        prompt=prompt, plain=emb[0], by_view=emb[1 : 1 + n], negative=emb[1 + n], null=emb[2 + n]
    )


def view_direction_index(
    elevation_deg: Tensor,
    azimuth_deg: Tensor,
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
) -> Tensor:
    """Index into ``VIEW_NAMES`` per camera [B] (long), by threestudio's rules (spec §1.1).

    Azimuth is wrapped to (-180, 180]. side (default) -> front if -ft < φ < ft -> back if
    φ > 180 - bt or φ < -180 + bt -> overhead if elevation > ot; later matches overwrite.
    """
    azimuth = wrap_azimuth(azimuth_deg.float())
    elevation = elevation_deg.float()
    index = torch.full(azimuth.shape, SIDE, dtype=torch.long, device=azimuth.device)
    index[(azimuth > -front_threshold) & (azimuth < front_threshold)] = FRONT
    index[(azimuth > 180.0 - back_threshold) | (azimuth < -180.0 + back_threshold)] = BACK
    index[elevation > overhead_threshold] = OVERHEAD
    return index


def interpolation_weights(azimuth_deg: Tensor) -> Tensor:
    """LucidDreamer's blend weights [B, len(VIEW_NAMES)] over the view embeddings (spec §1.1).

    φ ∈ [-90, 90): r = 1 - |φ|/90, emb = r E(front) + (1 - r) E(side);
    otherwise:     r = 1 - (|φ| - 90)/90, emb = r E(side) + (1 - r) E(back).
    """
    azimuth = wrap_azimuth(azimuth_deg.float())
    a = azimuth.abs()
    front_half = (azimuth >= -90.0) & (azimuth < 90.0)
    r_front = 1.0 - a / 90.0
    r_back = 1.0 - (a - 90.0) / 90.0
    weights = torch.zeros(*azimuth.shape, len(VIEW_NAMES), dtype=torch.float32, device=azimuth.device)
    weights[:, FRONT] = torch.where(front_half, r_front, torch.zeros_like(a))
    weights[:, SIDE] = torch.where(front_half, 1.0 - r_front, r_back)
    weights[:, BACK] = torch.where(front_half, torch.zeros_like(a), 1.0 - r_back)
    return weights


def embeds_for_cameras(
    embeds: PromptEmbeds,
    cams: Cameras,
    mode: ViewMode = "discrete",
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
) -> tuple[Tensor, Tensor]:
    """Per-camera text embeddings: (cond [B, L, D], uncond [B, L, D]).

    ``uncond`` is the negative-prompt embedding (spec §0: CFG's "unconditional" branch is the
    negative prompt; "" by default). Interpolated mode never uses "overhead" (LucidDreamer).
    """
    batch = len(cams)
    device = embeds.plain.device
    if mode == "discrete":
        index = view_direction_index(
            cams.elevation_deg, cams.azimuth_deg, front_threshold, back_threshold, overhead_threshold
        ).to(device)
        cond = embeds.by_view[index]
    elif mode == "interpolated":
        weights = interpolation_weights(cams.azimuth_deg).to(device)  # [B, V]
        cond = torch.einsum("bv,vld->bld", weights, embeds.by_view)
    elif mode == "none":
        cond = embeds.plain.unsqueeze(0).expand(batch, -1, -1)
    else:
        raise ValueError(f"view-dependent mode must be one of {VIEW_MODES}, got {mode!r}")
    uncond = embeds.negative.unsqueeze(0).expand(batch, -1, -1)
    return cond, uncond


def perp_neg_embeds_for_cameras(
    embeds: PromptEmbeds, cams: Cameras, weights: PerpNegWeights, overhead_threshold: float = 60.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Perp-Neg's per-camera embeddings and negative weights (threestudio
    ``PromptProcessorOutput.get_text_embeddings_perp_neg``; spec §1.2).

    Azimuth φ is wrapped to (−180, 180] (0 = front, as everywhere in dreamlab); E(v) is
    ``embeds.by_view`` of view v.

    * overhead (elevation > ``overhead_threshold``, as in ``view_direction_index``):
      positive E(overhead); the two negatives are the negative prompt, with weights 0.
    * |φ| < 90°: r = 1 − |φ|/90 (1 = front, 0 = side), positive r E(front) + (1 − r) E(side),
      negatives [E(front), E(side)] with weights [−f_fs(r), −f_sf(1 − r)].
    * |φ| ≥ 90°: r = 2 − |φ|/90 (1 = side, 0 = back), positive r E(side) + (1 − r) E(back),
      negatives [E(side), E(front)] with weights [−f_sb(r), −f_fsb(r)].

    The front/back thresholds play no part (only the overhead test uses a threshold). Note
    that φ = −90° belongs to the side↔back half here (threestudio: ``|φ| < 90``), whereas
    LucidDreamer's ``interpolation_weights`` puts it in the front half; the positive is E(side)
    either way.

    Args:
        weights: the decay functions (``dreamlab.guidance.common.PerpNegWeights``).
    Returns:
        (pos [B, L, D], uncond [B, L, D] = negative prompt, negs [B, 2, L, D], neg_weights [B, 2]).
    """
    batch = len(cams)
    device = embeds.plain.device
    azimuth = wrap_azimuth(cams.azimuth_deg.float()).to(device)
    elevation = cams.elevation_deg.float().to(device)
    a = azimuth.abs()
    front_half = a < 90.0
    overhead = elevation > overhead_threshold
    r = torch.where(front_half, 1.0 - a / 90.0, 2.0 - a / 90.0)

    by_view = embeds.by_view
    front, side, back = by_view[FRONT], by_view[SIDE], by_view[BACK]
    rr = r.view(-1, 1, 1).to(by_view.dtype)
    fh = front_half.view(-1, 1, 1)
    pos = torch.where(fh, rr * front + (1.0 - rr) * side, rr * side + (1.0 - rr) * back)
    pos = torch.where(overhead.view(-1, 1, 1), by_view[OVERHEAD], pos)

    negs = torch.stack([torch.where(fh, front, side), torch.where(fh, side, front)], dim=1)  # [B, 2, L, D]
    negs = torch.where(overhead.view(-1, 1, 1, 1), embeds.negative, negs)
    neg_weights = weights.negative_weights(r, front_half)
    neg_weights = torch.where(overhead.view(-1, 1), torch.zeros_like(neg_weights), neg_weights)

    uncond = embeds.negative.unsqueeze(0).expand(batch, -1, -1)
    return pos, uncond, negs, neg_weights
