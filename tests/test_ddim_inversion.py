"""DDIM inversion through ComfyUI's guider: round trips, model types, the INVERSION object and its file."""

import os

import pytest
import torch

import comfy.model_management
import comfy.sample
import folder_paths
import random_models
from conftest import pack_submodule
from helpers import encode, invert, relative_error, run_node
from support.inversion import tamed

ddim = pack_submodule("inversion.ddim")

DATA_MEAN, DATA_STD = 0.3, 0.8


def ideal_gaussian_denoiser(apply_model, args):
    """The exact denoiser for data x0 ~ N(0.3, 0.8^2) per element, whose probability-flow ODE is known."""
    x, sigma = args["input"], args["timestep"].reshape(-1, 1, 1, 1)
    return DATA_MEAN + DATA_STD**2 / (DATA_STD**2 + sigma**2) * (x - DATA_MEAN)


def sample_back(model, inverted, positive, negative, steps, cfg=1.0, scheduler="normal"):
    """KSamplerAdvanced with add_noise disabled: zero noise, start from the inverted latent."""
    samples = inverted["samples"]
    return comfy.sample.sample(model, torch.zeros_like(samples), steps, cfg, "euler", scheduler, positive, negative,
                               samples, disable_pbar=True, seed=0)


@pytest.fixture(scope="module")
def ideal(sd15):
    model = sd15.model.clone()
    model.set_model_unet_function_wrapper(ideal_gaussian_denoiser)
    scale = model.model.latent_format.scale_factor
    clean = DATA_MEAN + DATA_STD * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return model, clean / scale, encode(sd15.clip, "a cat"), encode(sd15.clip, "")


def test_inversion_of_the_ideal_denoiser_follows_the_exact_ode_and_converges_with_steps(ideal):
    model, latent, positive, negative = ideal
    scale = model.model.latent_format.scale_factor
    errors = {}
    for steps in (10, 50, 200):
        inverted, trajectory = invert(model, latent, positive, negative, steps)
        sigma_top = float(trajectory.sigmas[-1])
        exact_top = DATA_MEAN + (DATA_STD**2 + sigma_top**2) ** 0.5 / DATA_STD * (latent * scale - DATA_MEAN)
        assert relative_error(inverted["samples"] * scale, exact_top) < 2.0 / steps
        errors[steps] = relative_error(sample_back(model, inverted, positive, negative, steps), latent)
    assert errors[50] < 0.02
    assert errors[200] < errors[50] / 3 < errors[10] / 9  # DDIM inversion is first order in the step


@pytest.mark.parametrize("v_prediction", [False, True], ids=["eps", "v_prediction"])
def test_round_trip_on_a_tiny_unet(v_prediction):
    models = tamed(random_models.tiny_sd15(seed=5, v_prediction=v_prediction))
    positive, negative = encode(models.clip, "a cat"), encode(models.clip, "")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    errors = {}
    for steps, cfg in ((10, 1.0), (50, 1.0), (50, 3.0)):
        inverted, trajectory = invert(models.model, latent, positive, negative, steps, cfg)
        assert relative_error(inverted["samples"], latent) > 0.1  # it did move up the schedule
        errors[steps, cfg] = relative_error(sample_back(models.model, inverted, positive, negative, steps, cfg), latent)
    assert errors[50, 1.0] < 0.05 and errors[50, 3.0] < 0.05
    assert errors[50, 1.0] < errors[10, 1.0]
    comfy.model_management.unload_all_models()


def test_trajectory_starts_at_the_latent_and_climbs_the_schedule(ideal):
    model, latent, positive, negative = ideal
    inverted, trajectory = invert(model, latent, positive, negative, 8, scheduler="ddim_uniform")
    assert trajectory.sigmas[0] == 0 and bool((trajectory.sigmas[1:] > trajectory.sigmas[:-1]).all())
    assert trajectory.latents.shape == (9, 1, 4, 8, 8)
    scale = model.model.latent_format.scale_factor
    torch.testing.assert_close(trajectory.latents[0], latent * scale)
    torch.testing.assert_close(trajectory.top, inverted["samples"] * scale)


def test_a_sigma_outside_the_schedule_is_a_clear_error(ideal):
    model, latent, positive, negative = ideal
    _, trajectory = invert(model, latent, positive, negative, 4)
    torch.testing.assert_close(trajectory.latent_at(float(trajectory.sigmas[2])), trajectory.latents[2])
    with pytest.raises(ddim.ScheduleMismatchError, match="is not in the inversion's schedule .4 steps"):
        trajectory.latent_at(float(trajectory.sigmas[2]) * 1.1)


def test_inversion_leaves_the_model_clean(sd15):
    positive, negative = encode(sd15.clip, "a cat"), encode(sd15.clip, "")
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    fresh = comfy.sample.sample(sd15.model, noise, 3, 4.0, "euler", "normal", positive, negative, latent,
                                disable_pbar=True)
    invert(sd15.model, torch.randn(1, 4, 8, 8), positive, negative, 5, cfg=2.0)
    after = comfy.sample.sample(sd15.model, noise, 3, 4.0, "euler", "normal", positive, negative, latent,
                                disable_pbar=True)
    assert torch.equal(after, fresh)


def test_save_and_load_are_exact(ideal, tmp_path):
    model, latent, positive, negative = ideal
    _, trajectory = invert(model, latent, positive, negative, 4)
    folder_paths.set_output_directory(str(tmp_path))
    run_node("SaveInversion", inversion=trajectory, filename_prefix="inversions/cat")
    (saved,) = (tmp_path / "inversions").iterdir()
    assert saved.name == "cat_00001_.inversion.safetensors"
    name = "inversions/cat_00001_.inversion.safetensors [output]"
    assert name in pack_submodule("nodes.ddim_inversion").saved_files(".inversion.safetensors")
    (loaded,) = run_node("LoadInversion", inversion=name)
    assert torch.equal(loaded.sigmas, trajectory.sigmas) and torch.equal(loaded.latents, trajectory.latents)


def test_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    trajectory = ddim.InversionTrajectory(sigmas=torch.tensor([0.0, 1.0]), latents=torch.zeros(2, 1, 4, 8, 8))
    target = tmp_path / "x.inversion.safetensors"

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ddim.save_trajectory(trajectory, str(target))
    assert list(tmp_path.iterdir()) == []


def test_loading_a_file_that_is_not_an_inversion_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"sigmas": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="is not an inversion saved by Save Inversion"):
        ddim.load_trajectory(str(path))
