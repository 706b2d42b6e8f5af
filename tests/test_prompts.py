"""View-dependent prompting: threestudio's discrete rules, LucidDreamer interpolation, validation."""

from __future__ import annotations

import pytest
import torch

from dreamlab.prompts import (
    PromptConfig,
    build_prompt_embeds,
    embeds_for_cameras,
    interpolation_weights,
    view_direction_index,
)
from dreamlab.types import VIEW_NAMES, PromptEmbeds, orbit_cameras

FRONT, SIDE, BACK, OVERHEAD = (VIEW_NAMES.index(v) for v in ("front", "side", "back", "overhead"))


class _RecordingPrior:
    """encode_prompt gives each distinct text a distinct constant embedding [4, 3]."""

    def __init__(self):
        self.texts: list[str] = []

    def encode_prompt(self, texts):
        self.texts.extend(texts)
        return torch.stack([torch.full((4, 3), float(hash(t) % 1000)) for t in texts])


def _embeds() -> PromptEmbeds:
    by_view = torch.arange(len(VIEW_NAMES), dtype=torch.float32).view(-1, 1, 1) * torch.ones(
        len(VIEW_NAMES), 2, 3
    ) + 1.0  # view k embeds to the constant k + 1
    return PromptEmbeds(
        prompt="p",
        plain=torch.full((2, 3), 10.0),
        by_view=by_view,
        negative=torch.full((2, 3), -1.0),
        null=torch.zeros(2, 3),
    )


def _cams(elevations, azimuths):
    n = len(azimuths)
    return orbit_cameras(
        torch.tensor(elevations, dtype=torch.float32),
        torch.tensor(azimuths, dtype=torch.float32),
        torch.full((n,), 2.5),
        torch.full((n,), 45.0),
        8,
        8,
    )


def test_view_direction_boundaries():
    cases = [  # (elevation, azimuth, expected)
        (0.0, 0.0, FRONT),
        (0.0, 44.9, FRONT),
        (0.0, 45.0, SIDE),  # strict inequality
        (0.0, -45.0, SIDE),
        (0.0, -44.9, FRONT),
        (0.0, 90.0, SIDE),
        (0.0, 135.0, SIDE),
        (0.0, 135.1, BACK),
        (0.0, 180.0, BACK),
        (0.0, -180.0, BACK),  # wraps to 180
        (0.0, -135.0, SIDE),
        (0.0, -135.1, BACK),
        (0.0, 360.0, FRONT),  # wraps to 0
        (60.0, 0.0, FRONT),  # overhead needs elevation > 60
        (60.1, 0.0, OVERHEAD),
        (89.0, 180.0, OVERHEAD),  # overhead overrides back
    ]
    elev = torch.tensor([c[0] for c in cases])
    azim = torch.tensor([c[1] for c in cases])
    got = view_direction_index(elev, azim)
    assert got.dtype == torch.long
    assert got.tolist() == [c[2] for c in cases]


def test_view_direction_custom_thresholds():
    got = view_direction_index(
        torch.tensor([0.0, 0.0, 0.0, 50.0]),
        torch.tensor([29.0, 31.0, 151.0, 90.0]),
        front_threshold=30.0,
        back_threshold=30.0,
        overhead_threshold=45.0,
    )
    assert got.tolist() == [FRONT, SIDE, BACK, OVERHEAD]


def test_interpolation_weights_formula():
    azim = torch.tensor([0.0, 45.0, -45.0, 90.0, -90.0, 135.0, -135.0, 180.0, 30.0, 120.0])
    w = interpolation_weights(azim)
    expected = torch.zeros(len(azim), len(VIEW_NAMES))
    rows = [  # (front, side, back)
        (1.0, 0.0, 0.0),
        (0.5, 0.5, 0.0),
        (0.5, 0.5, 0.0),
        (0.0, 1.0, 0.0),
        (0.0, 1.0, 0.0),
        (0.0, 0.5, 0.5),
        (0.0, 0.5, 0.5),
        (0.0, 0.0, 1.0),
        (2 / 3, 1 / 3, 0.0),  # r = 1 - 30/90
        (0.0, 2 / 3, 1 / 3),  # r = 1 - (120 - 90)/90
    ]
    for i, (f, s, b) in enumerate(rows):
        expected[i, FRONT], expected[i, SIDE], expected[i, BACK] = f, s, b
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(len(azim)))


def test_embeds_for_cameras_modes():
    emb = _embeds()
    cams = _cams([0.0, 0.0, 0.0, 70.0], [0.0, 45.0, 180.0, 0.0])
    cond, uncond = embeds_for_cameras(emb, cams, "discrete")
    assert cond.shape == (4, 2, 3) and uncond.shape == (4, 2, 3)
    assert cond[:, 0, 0].tolist() == [FRONT + 1, SIDE + 1, BACK + 1, OVERHEAD + 1]
    assert (uncond == -1.0).all()
    cond, _ = embeds_for_cameras(emb, cams, "interpolated")
    # front=1, side=2, back=3; overhead is never used when interpolating
    torch.testing.assert_close(cond[:, 0, 0], torch.tensor([1.0, 1.5, 3.0, 1.0]))
    cond, _ = embeds_for_cameras(emb, cams, "none")
    assert (cond == 10.0).all()
    with pytest.raises(ValueError):
        embeds_for_cameras(emb, cams, "sideways")
    cfg = PromptConfig(front_threshold=30.0, back_threshold=30.0)
    cond, _ = cfg.embeds_for_cameras(emb, _cams([0.0], [40.0]))
    assert cond[0, 0, 0].item() == SIDE + 1


def test_build_prompt_embeds_templates():
    prior = _RecordingPrior()
    emb = build_prompt_embeds(prior, "  a corgi ", negative_prompt="blurry")
    assert prior.texts == [
        "a corgi",
        "a corgi, front view",
        "a corgi, side view",
        "a corgi, back view",
        "a corgi, overhead view",
        "blurry",
        "",
    ]
    assert emb.prompt == "a corgi"
    assert emb.by_view.shape == (4, 4, 3) and emb.plain.shape == (4, 3)
    assert not torch.equal(emb.negative, emb.null)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_rejected(prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        build_prompt_embeds(_RecordingPrior(), prompt)


def test_prompt_config_validate():
    PromptConfig().validate()
    with pytest.raises(ValueError):
        PromptConfig(view_dependent="sometimes").validate()
