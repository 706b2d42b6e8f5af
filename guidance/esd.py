"""ESD — Entropic Score Distillation (Peihao Wang et al., 2023, "Taming Mode Collapse in Score
Distillation for Text-to-3D Generation", arXiv 2401.00909; VITA-Group).

Update rule (descent gradient on the model-space image x; docs/guidance-spec.md §3):

    g = −w(t) [∇log p_t(x_t | y) − λ ∇log q_t(x_t | y) − (1 − λ) ∇log q_t(x_t | c, y)]
    ε-form:  g = w(t) [ε_pre − λ ε_ψ(x_t; y, ∅_c, t) − (1 − λ) ε_ψ(x_t; y, c, t)],  w(t) = 1 − ᾱ_t

with ε_pre the frozen prior's CFG prediction (convention A) and ε_ψ VSD's camera-conditioned
LoRA model (``dreamlab.guidance.vsd``). The extra −λ ∇log q_t(x_t | y) term is the gradient of the
entropy of the rendered-image distribution, which counters mode collapse (Janus). The
camera-marginal score comes from the same LoRA by the "CFG trick": the LoRA is trained with
camera-condition dropout (p = 0.1, zero camera), so it also learns ε_ψ(·; y, ∅_c), and

    λ ε_ψ(∅_c) + (1 − λ) ε_ψ(c) = ε_ψ(∅_c) + s_ψ (ε_ψ(c) − ε_ψ(∅_c))   with  s_ψ = 1 − λ,

i.e. ESD is VSD with ``guidance_scale_lora = 1 − λ``; λ = 0 is VSD exactly. Everything else (t
schedule, w(t), LoRA rank 4 / lr 1e-4, prior CFG 7.5, the LoRA step inside each call) is VSD's.

Reference code: VITA-Group/3D-Mode-Collapse (README: run threestudio's ``prolificdreamer.yaml``
with ``system.guidance.guidance_scale_lora=0.5``, i.e. λ = 0.5; ``gaussian_example.py`` is a 2-D
toy), on top of threestudio ``models/guidance/stable_diffusion_vsd_guidance.py``.
[UNVERIFIED] The paper's own default λ and whether it is annealed were not found in code:
``entropy_weight`` is a schedule with the README's 0.5 as default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamlab.guidance.vsd import VSD, LoRAScoreConfig
from dreamlab.priors.base import Prior
from dreamlab.prompts import PromptConfig
from dreamlab.schedules import Constant, Schedule


@dataclass
class ESDConfig(LoRAScoreConfig):
    """Entropic Score Distillation: VSD whose LoRA target mixes the camera-conditioned and the
    camera-marginal score, ε_est = λ ε_ψ(∅_c) + (1 − λ) ε_ψ(c). All other fields are VSD's
    (``LoRAScoreConfig``); the LoRA's camera dropout (``camera_dropout``, 0.1) must stay on.

    Builtin prior: suggested, untested, the VSD suggestion (``guidance_scale=7.5``,
    ``lora_lr=1e-3``) with the default λ = 0.5.
    """

    entropy_weight: Schedule = field(default_factory=lambda: Constant(0.5))
    """λ in [0, 1] vs. progress: weight of the entropy term (camera-marginal LoRA score). 0.5 =
    the ESD README's guidance_scale_lora 0.5 (λ = 1 − guidance_scale_lora); 0 gives VSD.
    [UNVERIFIED] the paper's default and any annealing; the spec suggests λ ∈ [0, 0.5]."""

    def validate(self) -> None:
        super().validate()
        for progress in (0.0, 0.5, 1.0):
            lam = self.entropy_weight(progress)
            if not 0.0 <= lam <= 1.0:
                raise ValueError(f"entropy_weight must stay in [0, 1], got {lam} at progress {progress}")
            if lam > 0.0 and self.camera_condition == "none":
                raise ValueError("entropy_weight > 0 needs camera_condition='extrinsics' (no camera, no camera-marginal score)")
            if lam > 0.0 and self.camera_dropout <= 0.0:
                raise ValueError(
                    "entropy_weight > 0 needs camera_dropout > 0: the LoRA learns the camera-free "
                    "score ε_ψ(x_t; y, ∅_c) only from camera-dropped training steps"
                )

    def build(self, prior: Prior, prompt: PromptConfig | None = None) -> ESD:
        """The guidance object for ``prior`` (copies its U-Net and adds the LoRA)."""
        self.validate()
        return ESD(self, prior, prompt or PromptConfig())


class ESD(VSD):
    """VSD with the LoRA's camera-CFG scale s_ψ = 1 − λ(progress) (see the module docstring)."""

    cfg: ESDConfig

    def lora_scale(self, progress: float) -> float:
        return 1.0 - float(self.cfg.entropy_weight(progress))
