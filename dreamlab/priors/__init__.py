"""Frozen diffusion priors and the ``PRIORS`` table of short names the CLI, UI and tests iterate.

``load_prior(name_or_id_or_path, device, dtype)`` accepts a short name from ``PRIORS``, a local
diffusers folder, or a Hugging Face hub id.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dreamlab.priors.base import Prior
from dreamlab.priors.builtin import ASSET_DIR as BUILTIN_ASSET_DIR
from dreamlab.priors.builtin import BuiltinPrior
from dreamlab.priors.stable_diffusion import PriorLoadError, StableDiffusionPrior

#: Short names -> Hugging Face hub ids. SD 1.5 lives at the community mirror since runwayml's
#: repository was taken down. "sd21" is the 768 px v-prediction model.
#: "builtin" is dreamlab's own offline prior, shipped in assets/builtin-prior (no download).
PRIORS: dict[str, str] = {
    "builtin": str(BUILTIN_ASSET_DIR),
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "sd21": "stabilityai/stable-diffusion-2-1",
}


def load_prior(
    name_or_id_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    local_files_only: bool = False,
) -> Prior:
    """Loads a prior by short name (``PRIORS``), local diffusers folder, or hub id.

    Args:
        name_or_id_or_path: e.g. "sd21-base", "/models/my-sd15", "stabilityai/stable-diffusion-2-1-base".
        device: where the networks run.
        dtype: default fp16 on CUDA, fp32 on CPU.
        local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
    Raises:
        PriorLoadError: with a one-line message saying what is missing and how to fix it.
    """
    source = str(name_or_id_or_path)
    if source in PRIORS and not Path(source).exists():
        source = PRIORS[source]
    elif not Path(source).expanduser().exists() and "/" not in source and os.sep not in source:
        raise PriorLoadError(
            f"unknown prior '{source}': use a short name ({', '.join(PRIORS)}), a local diffusers "
            "folder, or a hub id 'owner/name' (hub downloads need network access)."
        )
    if BuiltinPrior.is_builtin_folder(source) or source == str(BUILTIN_ASSET_DIR):
        return BuiltinPrior.from_pretrained(source, device=device)
    return StableDiffusionPrior.from_pretrained(
        source, device=device, dtype=dtype, local_files_only=local_files_only
    )


__all__ = ["BuiltinPrior", "PRIORS", "Prior", "PriorLoadError", "StableDiffusionPrior", "load_prior"]
