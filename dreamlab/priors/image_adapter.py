"""Image prompts for the builtin prior: a small IP-Adapter (Ye et al., 2023, arXiv 2308.06721).

VPCSM (TV-3DG) conditions the frozen denoiser on a reference image through IP-Adapter's
*decoupled cross-attention*: every cross-attention layer keeps its text keys/values and gains a
second, image-only attention over a few image tokens,

    h = Attn(Q, K_txt, V_txt) + λ_ip · Attn(Q, W_k^ip f_I, W_v^ip f_I)

(diffusers' ``IPAdapterAttnProcessor2_0`` implements exactly this). Stable Diffusion gets its
image tokens from a CLIP image encoder and the published IP-Adapter weights; the builtin prior
has no CLIP, so dreamlab trains its own small adapter on the procedural world's renders
(``dreamlab prior train-image-adapter``, :mod:`dreamlab.priors.train_image_adapter`):

* image encoder: a 3-layer strided CNN on the 32×32 reference render -> one ``embed_dim``
  vector (the role CLIP's image embedding plays in IP-Adapter; hand-written because no library
  ships an image encoder at this size);
* projection: diffusers' ``ImageProjection`` (linear to ``num_tokens`` tokens + LayerNorm), as
  IP-Adapter's;
* W_k^ip, W_v^ip per cross-attention layer, initialised from the layer's text W_k, W_v
  (IP-Adapter's initialisation), trained with the U-Net and text encoder frozen.

"No image" is the all-zero image embedding (IP-Adapter's convention for the unconditional
branch; training drops the image to zeros with ``image_dropout``). The adapter's processors are
swapped into the U-Net only for image-prompted calls (:meth:`ImagePromptAdapter.attached`), so
the text-only prior is bit-for-bit unchanged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

ADAPTER_DIR = "image-adapter"
"""Sub-folder of a saved builtin prior holding its image-prompt adapter."""
ADAPTER_MARKER = "dreamlab_image_adapter.json"


@dataclass
class ImageAdapterConfig:
    """Shape of the builtin prior's image-prompt adapter."""

    embed_dim: int = 128
    """Width of the image embedding (CLIP's image embedding in IP-Adapter)."""
    num_tokens: int = 4
    """Image tokens the embedding is projected to (IP-Adapter: 4)."""
    channels: tuple[int, int, int] = (32, 64, 128)
    """Channels of the image encoder's three stride-2 convolutions."""
    image_size: int = 32
    """Pixels per side the reference image is resized to before encoding."""

    def validate(self) -> None:
        if self.embed_dim < 1 or self.num_tokens < 1:
            raise ValueError("image adapter embed_dim and num_tokens must be >= 1")
        if len(self.channels) != 3 or min(self.channels) < 1:
            raise ValueError(f"image adapter channels must be three positive ints, got {self.channels}")
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image adapter image_size must be a multiple of 8, >= 8, got {self.image_size}")


class ReferenceImageEncoder(nn.Module):
    """[N, 3, S, S] RGB in [0, 1] -> [N, embed_dim] (three stride-2 conv + SiLU, then linear)."""

    def __init__(self, cfg: ImageAdapterConfig) -> None:
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.convs = nn.Sequential(
            nn.Conv2d(3, c1, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.SiLU(),
        )
        side = cfg.image_size // 8
        self.head = nn.Linear(c3 * side * side, cfg.embed_dim)
        self.image_size = cfg.image_size

    def forward(self, rgb: Tensor) -> Tensor:
        x = torch.nn.functional.interpolate(
            rgb, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
        )
        return self.head(self.convs(x * 2.0 - 1.0).flatten(1))


def _cross_attention_layers(unet) -> dict[str, nn.Module]:
    """Processor name -> Attention module for every cross-attention (``attn2``) layer."""
    layers = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            layers[name] = unet.get_submodule(name[: -len(".processor")])
    return layers


class CLIPImageEmbedder(nn.Module):
    """[N, 3, H, W] RGB in [0, 1] -> CLIP ``image_embeds`` [N, E] (Stable Diffusion's IP-Adapter
    encoder): resized to the vision model's input size (bicubic, antialiased; the image prompt is
    already square) and normalised with CLIP's mean / std, as ``CLIPImageProcessor`` does."""

    def __init__(self, vision_model, image_mean, image_std) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.size = int(vision_model.config.image_size)
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, rgb: Tensor) -> Tensor:
        x = torch.nn.functional.interpolate(
            rgb.float(), size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False
        ).clamp(0.0, 1.0)
        x = ((x - self.mean) / self.std).to(next(self.vision_model.parameters()).dtype)
        return self.vision_model(pixel_values=x).image_embeds.float()


class ImagePromptAdapter(nn.Module):
    """Image encoder + token projection + decoupled-attention processors for one U-Net.

    Built fresh for the builtin prior (``ImagePromptAdapter(cfg, unet)``: W^ip copied from the
    text W_k / W_v, to be trained), or from published IP-Adapter weights for Stable Diffusion
    (:meth:`from_ip_adapter_weights`).
    """

    def __init__(self, cfg: ImageAdapterConfig | None, unet, encoder: nn.Module | None = None,
                 embed_dim: int | None = None, num_tokens: int | None = None) -> None:
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
        from diffusers.models.embeddings import ImageProjection

        super().__init__()
        if cfg is not None:
            cfg.validate()
            encoder, embed_dim, num_tokens = ReferenceImageEncoder(cfg), cfg.embed_dim, cfg.num_tokens
        if encoder is None or embed_dim is None or num_tokens is None:
            raise ValueError("an image-prompt adapter needs a config, or an encoder with its embed_dim and num_tokens")
        self.cfg = cfg
        cross_dim = int(unet.config.cross_attention_dim)
        self.encoder = encoder
        self.projection = ImageProjection(embed_dim, cross_dim, num_tokens)
        layers = _cross_attention_layers(unet)
        self.processor_names = list(layers)
        processors = []
        for attn in layers.values():
            hidden = attn.to_k.out_features
            proc = IPAdapterAttnProcessor2_0(hidden, cross_dim, num_tokens=(num_tokens,), scale=1.0)
            with torch.no_grad():  # IP-Adapter's initialisation: copy the text keys/values
                proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
                proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
            processors.append(proc)
        if not processors:
            raise ValueError("this U-Net has no cross-attention layers: it cannot take an image prompt")
        self.processors = nn.ModuleList(processors)

    @classmethod
    def from_ip_adapter_weights(cls, unet, state: dict[str, dict[str, Tensor]], encoder: nn.Module) -> ImagePromptAdapter:
        """Published IP-Adapter weights (``{"image_proj": {...}, "ip_adapter": {...}}``, the
        ``tencent-ailab/IP-Adapter`` / ``h94/IP-Adapter`` format of the plain, 4-token adapter).

        Key layout (as diffusers' ``_convert_ip_adapter_attn_to_diffusers`` reads it): the k-th
        cross-attention layer of ``unet.attn_processors`` (k = 0, 1, ...) holds
        ``ip_adapter["{2k+1}.to_k_ip.weight"]`` and ``"...to_v_ip.weight"``; ``image_proj`` has
        ``proj.weight`` [K·D, E], ``proj.bias``, ``norm.weight``, ``norm.bias``.
        """
        proj = state.get("image_proj", {})
        if "proj.weight" not in proj:
            raise ValueError("unsupported IP-Adapter weights: only the plain 4-token IP-Adapter "
                             "(image_proj.proj.weight) is supported, not Plus / Full / FaceID")
        cross_dim = int(unet.config.cross_attention_dim)
        num_tokens = proj["proj.weight"].shape[0] // cross_dim
        embed_dim = proj["proj.weight"].shape[1]
        adapter = cls(None, unet, encoder=encoder, embed_dim=embed_dim, num_tokens=num_tokens)
        with torch.no_grad():
            adapter.projection.image_embeds.weight.copy_(proj["proj.weight"])
            adapter.projection.image_embeds.bias.copy_(proj["proj.bias"])
            adapter.projection.norm.weight.copy_(proj["norm.weight"])
            adapter.projection.norm.bias.copy_(proj["norm.bias"])
            ip = state.get("ip_adapter", {})
            for k, processor in enumerate(adapter.processors):
                key = 2 * k + 1
                try:
                    processor.to_k_ip[0].weight.copy_(ip[f"{key}.to_k_ip.weight"])
                    processor.to_v_ip[0].weight.copy_(ip[f"{key}.to_v_ip.weight"])
                except KeyError:
                    raise ValueError(
                        f"the IP-Adapter weights do not fit this U-Net: no ip_adapter.{key}.to_k_ip.weight "
                        f"for its cross-attention layer {k} (an adapter for another Stable Diffusion version?)"
                    ) from None
                except RuntimeError as err:
                    raise ValueError(f"the IP-Adapter weights do not fit this U-Net ({str(err).splitlines()[0]})") from None
        return adapter

    def embed(self, rgb: Tensor) -> Tensor:
        """Reference images [N, 3, H, W] in [0, 1] -> image embeddings [N, embed_dim]."""
        return self.encoder(rgb)

    def tokens(self, image_embeds: Tensor) -> Tensor:
        """Image embeddings [N, embed_dim] (zeros = no image) -> image tokens [N, K, cross_dim]."""
        return self.projection(image_embeds)

    def set_scale(self, scale: float) -> None:
        """λ_ip of every decoupled attention."""
        for proc in self.processors:
            proc.scale = [float(scale)]

    @contextlib.contextmanager
    def attached(self, unet) -> Iterator[None]:
        """Swaps the decoupled-attention processors into ``unet`` for the duration (the U-Net's
        own processors are restored on exit, even after an error)."""
        saved = dict(unet.attn_processors)
        swapped = dict(saved)
        for name, proc in zip(self.processor_names, self.processors):
            swapped[name] = proc
        unet.set_attn_processor(swapped)
        try:
            yield
        finally:
            unet.set_attn_processor(saved)

    # ------------------------------------------------------------------ I/O

    def save(self, folder: Path | str) -> None:
        """Writes ``adapter.safetensors`` + the marker JSON into ``folder`` (atomically)."""
        from safetensors.torch import save_file

        from dreamlab.export.atomic import atomic_write, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.state_dict().items()}
        with atomic_write(folder / "adapter.safetensors") as tmp:
            save_file(state, str(tmp))
        if self.cfg is None:
            raise ValueError("only a builtin-prior adapter (built from an ImageAdapterConfig) can be saved")
        meta = {"kind": "dreamlab-image-adapter", "config": asdict(self.cfg)}
        atomic_write_text(folder / ADAPTER_MARKER, json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path | str, unet) -> ImagePromptAdapter:
        """Loads a saved adapter for ``unet``. Raises ValueError with a one-line reason."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / ADAPTER_MARKER).read_text(encoding="utf-8"))
            raw = dict(meta["config"])
            raw["channels"] = tuple(raw["channels"])
            adapter = cls(ImageAdapterConfig(**raw), unet)
            state = load_file(str(folder / "adapter.safetensors"))
            adapter.load_state_dict({k: v.float() for k, v in state.items()})
        except Exception as err:  # noqa: BLE001 - any broken file means the adapter is unusable
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise ValueError(f"the image-prompt adapter in {folder} is damaged ({first}); retrain it "
                             "with `dreamlab prior train-image-adapter`") from None
        return adapter.eval().requires_grad_(False)

    @staticmethod
    def is_adapter_folder(folder: Path | str) -> bool:
        return (Path(folder) / ADAPTER_MARKER).is_file()
