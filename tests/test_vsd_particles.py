"""VSD / ESD with several particles (ProlificDreamer ``--n_particles``): the trainer trains N
independent 3D models, calls the guidance once on all N·V renders (one shared LoRA), and gives
each particle's renders exactly the one-particle gradient; checkpoints, resume, the CLI option
and export of every particle; N = 1 stays the single-model trainer."""

from __future__ import annotations


import pytest
import torch
from guidance_fixtures import capture_latents

from dreamlab.cameras import CameraSamplerConfig
from dreamlab.checkpoint import load_checkpoint
from dreamlab.config import RunConfig, TrainConfig
from dreamlab.guidance.esd import ESDConfig
from dreamlab.guidance.vsd import VSDConfig
from dreamlab.priors.stable_diffusion import StableDiffusionPrior
from dreamlab.priors.testing import make_tiny_sd_components, make_tiny_sd_folder
from dreamlab.renderers.gaussians.model import GaussianConfig
from dreamlab.schedules import Piecewise
from dreamlab.train import Trainer, cat_cameras, num_particles
from dreamlab.types import orbit_cameras

VIEWS = 2


@pytest.fixture(scope="module")
def prior() -> StableDiffusionPrior:
    return StableDiffusionPrior.from_components(*make_tiny_sd_components())


def _cfg(particles: int = 2, steps: int = 4, guidance=None) -> RunConfig:
    guidance = guidance or VSDConfig(num_particles=particles, lora_lr=1e-3, loss_scale=2.0)
    return RunConfig(
        prompt="a red cube",
        guidance=guidance,
        renderer=GaussianConfig(num_init=200),
        train=TrainConfig(steps=steps, resolution=Piecewise((16.0,), ()), checkpoint_every=2, preview_every=0,
                          cameras=CameraSamplerConfig(batch_size=VIEWS)),
        device="cpu",
    )


def _params(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in r.named_parameters()} for r in trainer.renderers]


def _record_calls(trainer: Trainer) -> list:
    calls = []
    real = trainer.guidance

    def recording(rgb, cams, embeds, progress, generator):
        out = real(rgb, cams, embeds, progress, generator)
        calls.append((rgb, cams, out))
        return out

    trainer.guidance = recording
    return calls


def test_config_and_counting():
    VSDConfig(num_particles=4).validate()
    ESDConfig(num_particles=3).validate()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_particles"):
            VSDConfig(num_particles=bad).validate()
    assert num_particles(_cfg(3)) == 3 and num_particles(_cfg(guidance=ESDConfig(num_particles=2))) == 2
    from dreamlab.guidance.sds import SDSConfig

    assert num_particles(_cfg(guidance=SDSConfig())) == 1  # other methods: one model


def test_cat_cameras():
    a = orbit_cameras(torch.tensor([10.0]), torch.tensor([20.0]), torch.tensor([2.5]), torch.tensor([45.0]), 8, 8)
    b = orbit_cameras(torch.tensor([0.0, 5.0]), torch.tensor([-90.0, 170.0]), torch.tensor([2.0, 3.0]),
                      torch.tensor([40.0, 50.0]), 8, 8)
    c = cat_cameras([a, b])
    assert len(c) == 3 and (c.width, c.height) == (8, 8)
    for name in ("c2w", "fov_y", "elevation_deg", "azimuth_deg", "distance"):
        assert torch.equal(getattr(c, name), torch.cat([getattr(a, name), getattr(b, name)])), name
    assert cat_cameras([a]) is a


def test_particles_share_one_guidance_call_and_get_the_one_particle_gradient(prior, monkeypatch):
    trainer = Trainer(_cfg(particles=3, steps=3), prior=prior)
    assert len(trainer.renderers) == 3 and trainer.renderer is trainer.renderers[0]
    start = _params(trainer)
    assert not torch.equal(start[0]["means"], start[1]["means"])  # independent initialisations
    vsd = trainer.guidance
    lora_before = {k: v.detach().clone() for k, v in vsd.lora_params.items()}
    calls = _record_calls(trainer)
    store = capture_latents(prior, monkeypatch)

    report = trainer.train_step()
    assert not report.skipped and report.num_gaussians == sum(r.size for r in trainer.renderers)
    # ONE guidance call on the N·V renders, particle by particle, with each particle's cameras.
    assert len(calls) == 1
    rgb, cams, out = calls[0]
    assert rgb.shape[0] == 3 * VIEWS and len(cams) == 3 * VIEWS and len(out.timesteps) == 3 * VIEWS
    assert len({tuple(cams.azimuth_deg[p * VIEWS:(p + 1) * VIEWS].tolist()) for p in range(3)}) == 3
    # Each view's latent gets loss_scale · g / V (not / (N·V)): the one-particle gradient.
    latents = store[0]
    torch.testing.assert_close(latents.grad, 2.0 * out.aux.grad / VIEWS, rtol=1e-6, atol=1e-6)
    assert out.aux.grad.abs().max() > 1e-4
    # Every particle moved, and the shared LoRA took its step on all N·V latents.
    after = _params(trainer)
    for p in range(3):
        assert not torch.equal(after[p]["means"], start[p]["means"]), p
    assert any(not torch.equal(v, lora_before[k]) for k, v in vsd.lora_params.items())
    assert out.aux.lora_timesteps.shape == (3 * VIEWS,)


def test_particle_checkpoint_resume_is_bit_exact(prior, tmp_path):
    straight = Trainer(_cfg(particles=2, steps=4), prior=prior, run_dir=tmp_path / "a")
    list(straight)

    first = Trainer(_cfg(particles=2, steps=4), prior=prior, run_dir=tmp_path / "b")
    for report in first:
        if report.step == 2:
            assert report.checkpoint is not None
            break
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_0000002.pt")
    assert "renderer" in state and len(state["particles"]) == 1
    resumed = Trainer(_cfg(particles=2, steps=4), prior=prior, run_dir=tmp_path / "b")
    assert resumed.resume() is not None and resumed.step == 2
    list(resumed)
    for a, b in zip(_params(straight), _params(resumed)):
        for name, value in a.items():
            assert torch.equal(value, b[name]), name
    for name, value in straight.guidance.lora_params.items():
        assert torch.equal(value, resumed.guidance.lora_params[name]), name

    # a different particle count is a different run
    from dreamlab.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="different settings"):
        Trainer(_cfg(particles=3, steps=4), prior=prior, run_dir=tmp_path / "b").resume()


def test_one_particle_is_the_single_model_trainer(prior, tmp_path):
    """N = 1: one renderer, no "particles" entry in checkpoints, the old loss (no × N)."""
    trainer = Trainer(_cfg(particles=1, steps=2), prior=prior, run_dir=tmp_path)
    calls = _record_calls(trainer)
    reports = list(trainer)
    assert len(trainer.renderers) == 1 and len(calls) == 2
    rgb, _, out = calls[0]
    assert rgb.shape[0] == VIEWS
    assert reports[-1].num_gaussians == trainer.renderer.size
    assert "particles" not in load_checkpoint(tmp_path / "checkpoints" / "step_0000002.pt")


def test_esd_particles_train(prior):
    cfg = _cfg(guidance=ESDConfig(num_particles=2, lora_lr=1e-3), steps=2)
    trainer = Trainer(cfg, prior=prior)
    reports = list(trainer)
    assert len(trainer.renderers) == 2 and not any(r.skipped for r in reports)


def test_cli_option_and_every_particle_is_exported(tmp_path, monkeypatch):
    import dreamlab.export as export
    from dreamlab.cli import _parse, build_run_config, main

    cfg = build_run_config(_parse(["generate", "a red cube", "--guidance", "vsd", "--vsd.num-particles", "3"]))
    assert cfg.guidance.num_particles == 3
    prior_dir = tmp_path / "tiny-sd"
    make_tiny_sd_folder(prior_dir)
    exported = []

    def fake_export(renderer, out_dir, cfg=None, formats=()):
        exported.append((renderer, out_dir))
        return []

    monkeypatch.setattr(export, "export_asset", fake_export)
    code = main(["generate", "a red cube", "--prior", str(prior_dir), "--guidance", "vsd",
                 "--vsd.num-particles", "2", "--steps", "2", "--gaussians", "200", "--resolution", "16",
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    run_dir = tmp_path / "out" / "a-red-cube"
    assert [d for _, d in exported] == [run_dir, run_dir / "particle_1"]
    assert exported[0][0] is not exported[1][0]


def test_export_command_picks_a_particle(tmp_path):
    from plyfile import PlyData

    from dreamlab.checkpoint import find_latest_checkpoint, load_checkpoint
    from dreamlab.cli import main

    prior_dir = tmp_path / "tiny-sd"
    make_tiny_sd_folder(prior_dir)
    assert main(["generate", "a red cube", "--prior", str(prior_dir), "--guidance", "vsd",
                 "--vsd.num-particles", "2", "--steps", "2", "--gaussians", "200", "--resolution", "16",
                 "--formats", "png", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    run_dir = tmp_path / "out" / "a-red-cube"
    ckpt = find_latest_checkpoint(run_dir / "checkpoints")
    state = load_checkpoint(ckpt)
    assert main(["export", str(ckpt), "--format", "ply", "--particle", "1"]) == 0
    ply = PlyData.read(str(run_dir / "particle_1" / "splats.ply"))
    means = state["particles"][0]["params"]["means"]
    xyz = torch.tensor([[v["x"], v["y"], v["z"]] for v in ply["vertex"]])
    assert torch.allclose(xyz, means, atol=1e-6)  # particle 1's own Gaussians
    assert not torch.allclose(xyz, state["renderer"]["params"]["means"], atol=1e-3)
    assert main(["export", str(ckpt), "--format", "ply", "--particle", "2"]) == 2
