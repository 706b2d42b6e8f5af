"""The training loop: determinism, in-process resume, the non-finite guard, schedules, config I/O."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dreamlab.config import RunConfig, TrainConfig, config_from_json, config_to_json
from dreamlab.guidance.sds import SDSConfig
from dreamlab.priors.stable_diffusion import StableDiffusionPrior
from dreamlab.priors.testing import make_tiny_sd_components
from dreamlab.renderers.gaussians.model import GaussianConfig
from dreamlab.schedules import Piecewise
from dreamlab.train import Trainer
from dreamlab.types import GuidanceOutput


@pytest.fixture(scope="module")
def prior() -> StableDiffusionPrior:
    return StableDiffusionPrior.from_components(*make_tiny_sd_components())


def _cfg(steps: int = 6, **train) -> RunConfig:
    return RunConfig(
        prompt="a red cube",
        guidance=SDSConfig(guidance_scale=7.5),
        renderer=GaussianConfig(num_init=300),
        train=TrainConfig(steps=steps, resolution=Piecewise((16.0, 24.0), (0.5,)),
                          checkpoint_every=3, preview_every=0, **train),
        device="cpu",
    )


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.renderer.named_parameters()}


def test_same_seed_same_result_and_reports(prior):
    a, b = Trainer(_cfg(), prior=prior), Trainer(_cfg(), prior=prior)
    reports = list(a)
    list(b)
    assert [r.step for r in reports] == list(range(1, 7))
    assert [r.resolution for r in reports] == [16, 16, 16, 24, 24, 24]
    assert all(math.isfinite(r.loss) and not r.skipped for r in reports)
    for name, value in _params(a).items():
        assert torch.equal(value, _params(b)[name]), name
    c = Trainer(dataclasses.replace(_cfg(), train=dataclasses.replace(_cfg().train, seed=1)), prior=prior)
    list(c)
    assert not torch.equal(_params(c)["means"], _params(a)["means"])


def test_resume_in_process_is_bit_exact(prior, tmp_path):
    straight = Trainer(_cfg(), prior=prior, run_dir=tmp_path / "a")
    list(straight)

    first = Trainer(_cfg(), prior=prior, run_dir=tmp_path / "b")
    for report in first:
        if report.step == 3:
            assert report.checkpoint is not None
            break
    resumed = Trainer(_cfg(), prior=prior, run_dir=tmp_path / "b")
    used = resumed.resume()
    assert used is not None and used.name == "step_0000003.pt" and resumed.step == 3
    list(resumed)
    for name, value in _params(straight).items():
        assert torch.equal(value, _params(resumed)[name]), name


def test_resume_refuses_a_different_run(prior, tmp_path):
    from dreamlab.checkpoint import CheckpointError

    first = Trainer(_cfg(), prior=prior, run_dir=tmp_path)
    list(first)
    other = dataclasses.replace(_cfg(), prompt="a blue cube")
    with pytest.raises(CheckpointError, match="different settings"):
        Trainer(other, prior=prior, run_dir=tmp_path).resume()


def test_checkpoint_from_before_a_new_option_still_resumes(tmp_path):
    """A dreamlab upgrade that adds a setting must not orphan existing runs: a fingerprint that
    lacks the new key matches when the run keeps the default, and not when it changes it."""
    import json

    from dreamlab.config import fingerprint_matches, training_fingerprint

    cfg = _cfg()
    old = json.loads(training_fingerprint(cfg))
    del old["guidance"]["perp_neg"]  # as written by a version without Perp-Neg
    assert fingerprint_matches(json.dumps(old, sort_keys=True), cfg)
    changed = dataclasses.replace(cfg, guidance=dataclasses.replace(cfg.guidance, perp_neg=True))
    assert not fingerprint_matches(json.dumps(old, sort_keys=True), changed)
    old["guidance"]["retired_option"] = 1  # a setting this version no longer has
    assert not fingerprint_matches(json.dumps(old, sort_keys=True), cfg)
    assert not fingerprint_matches("not json", cfg)


def test_non_finite_loss_skips_the_step_and_keeps_parameters_finite(prior, monkeypatch):
    trainer = Trainer(_cfg(steps=4), prior=prior)
    real_guidance = trainer.guidance
    calls = {"n": 0}

    def poisoned(rgb, cams, embeds, progress, generator):
        out = real_guidance(rgb, cams, embeds, progress, generator)
        calls["n"] += 1
        if calls["n"] == 2:  # second step: NaN gradient reaches the image
            return GuidanceOutput(loss=out.loss + (rgb * float("nan")).sum(),
                                  timesteps=out.timesteps, grad_norm=out.grad_norm)
        return out

    trainer.guidance = poisoned
    before = _params(trainer)
    reports = [next(iter(trainer))]
    after_first = _params(trainer)
    reports.append(next(iter(trainer)))
    after_second = _params(trainer)
    reports += list(trainer)
    assert [r.skipped for r in reports] == [False, True, False, False]
    assert "non-finite" in reports[1].message
    assert not torch.equal(before["means"], after_first["means"])
    for name in after_first:  # the skipped step changed nothing
        assert torch.equal(after_first[name], after_second[name]), name
    for value in _params(trainer).values():
        assert torch.isfinite(value).all()


def test_learning_rates_follow_their_schedules(prior):
    trainer = Trainer(_cfg(steps=5), prior=prior)
    list(trainer)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    cfg = trainer.cfg.renderer
    # the last step ran at progress 1
    assert lrs["means"] == pytest.approx(cfg.lr_means(1.0))
    assert lrs["opacity"] == pytest.approx(cfg.lr_opacity(1.0))


def test_preview_is_attached(prior):
    cfg = _cfg(steps=2)
    cfg.train.preview_every = 2
    cfg.train.preview_resolution = 20
    reports = list(Trainer(cfg, prior=prior))
    assert reports[0].preview is None
    assert reports[1].preview.shape == (20, 20, 3)


def test_config_json_round_trip():
    cfg = _cfg()
    cfg.export = cfg.export.with_overrides(faces=1234, size_m=2.5, texture_size=256)
    again = config_from_json(config_to_json(cfg))
    assert again == cfg
    with pytest.raises(ValueError, match="not valid JSON"):
        config_from_json("{nope")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c.train, "steps", 0), "--steps"),
        (lambda c: setattr(c, "prompt", "  "), "empty"),
        (lambda c: setattr(c.train.cameras, "distance", (3.0, 1.0)), "low <= high"),
        (lambda c: setattr(c.train, "resolution", Piecewise((2.0,), ())), "resolution"),
    ],
)
def test_impossible_settings_are_refused(change, message):
    cfg = _cfg()
    change(cfg)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
