"""DDIM inversion on a flow model (Flux: ComfyUI's CONST sampling, x = (1 - sigma) x0 + sigma * noise),
where the ascending schedule ends at sigma exactly 1: the inverted latent is finite there, each step is
Euler on the velocity, and ComfyUI's euler sampler brings the latent back."""

import pytest
import torch

import comfy.model_management
import comfy.sample
import random_dits
from helpers import invert, relative_error

MEAN, STD = 0.3, 0.8


def ideal_flow_denoiser(apply_model, args):
    """E[x0 | x] for data x0 ~ N(0.3, 0.8^2) per element on the straight path (1 - sigma) x0 + sigma * n."""
    x, sigma = args["input"], args["timestep"].reshape(-1, 1, 1, 1)
    return MEAN + (1 - sigma) * STD**2 / ((1 - sigma) ** 2 * STD**2 + sigma**2) * (x - (1 - sigma) * MEAN)


def exact_flow(clean, sigma):
    """The probability-flow ODE's solution from clean (model space) for that data: affine in clean."""
    return (1 - sigma) * MEAN + ((1 - sigma) ** 2 * STD**2 + sigma**2) ** 0.5 / STD * (clean - MEAN)


def sample_back(model, inverted, positive, steps, scheduler="simple"):
    """ComfyUI's euler sampler at cfg 1 over the same (descending) schedule, from the inverted state at sigma 1.

    A flow sampler's first state is noise_scaling(1, noise, latent_image) = noise, whatever the latent
    image: the inverted state enters as the noise (in model space), the latent image is zeros."""
    noise = model.model.process_latent_in(inverted["samples"])
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", scheduler, positive, positive,
                               torch.zeros_like(noise), disable_pbar=True, seed=0)


@pytest.fixture(scope="module")
def flux():
    model = random_dits.tiny_flux(seed=3)
    yield model
    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def ideal(flux):
    model = flux.clone()
    model.set_model_unet_function_wrapper(ideal_flow_denoiser)
    clean = MEAN + STD * torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    return model, clean, model.model.process_latent_out(clean.clone()), random_dits.flux_conditioning(1)


def test_inversion_of_the_ideal_flow_denoiser_follows_the_exact_ode_in_comfyuis_flow_space(ideal):
    """Every state of the trajectory is the ODE's solution at its sigma in the space a sampler (and the
    Style Reference (Inversion)) hands the model: (1 - sigma) x0 + sigma * n; at sigma 1 the noise."""
    model, clean, latent, positive = ideal
    errors, round_trips = {}, {}
    for steps in (10, 50, 200):
        inverted, trajectory = invert(model, latent, positive, positive, steps, scheduler="simple")
        assert float(trajectory.sigmas[-1]) == 1.0
        assert torch.isfinite(inverted["samples"]).all()
        torch.testing.assert_close(trajectory.latents[0], clean)
        torch.testing.assert_close(model.model.process_latent_in(inverted["samples"]), trajectory.top)
        exact = torch.stack([exact_flow(clean, float(sigma)) for sigma in trajectory.sigmas])
        errors[steps] = max(relative_error(state, want) for state, want in zip(trajectory.latents, exact))
        round_trips[steps] = relative_error(sample_back(model, inverted, positive, steps), latent)
    # measured 0.18, 0.029, 0.0071 (at most 1.8 / steps): first order in the step, like DDIM inversion
    assert all(error < 2.0 / steps for steps, error in errors.items())
    assert errors[200] < errors[50] / 3 < errors[10] / 9
    assert relative_error(trajectory.top, (clean - MEAN) / STD) < 2.0 / 200  # the standardised data: the noise
    # measured 0.050, 0.014, 0.0037
    assert round_trips[50] < 0.02 and round_trips[200] < round_trips[50] / 3 < round_trips[10] / 9


def test_the_inverted_latent_of_a_flux_is_finite_at_sigma_1_and_is_the_trajectorys_top(flux):
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    inverted, trajectory = invert(flux, latent, random_dits.flux_conditioning(1), random_dits.flux_conditioning(2), 4,
                                  scheduler="simple")
    assert float(trajectory.sigmas[-1]) == 1.0 and torch.isfinite(trajectory.latents).all()
    assert torch.isfinite(inverted["samples"]).all()
    torch.testing.assert_close(inverted["samples"], flux.model.process_latent_out(trajectory.top.clone()))
    assert relative_error(inverted["samples"], latent) > 0.1  # it did move up the schedule


def velocity(flux, x, sigma, positive):
    """The Flux's raw output (the velocity n - x0) at x labelled sigma: no input scaling on a flow model."""
    context, extras = positive[0]
    with torch.no_grad():
        return flux.model.diffusion_model(x, sigma.reshape(1), context=context, y=extras["pooled_output"],
                                          guidance=torch.tensor([extras["guidance"]]))


def test_each_step_is_euler_on_the_velocity_at_the_next_sigma(flux):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_{i+1}): the flow form of DDIM inversion."""
    positive = random_dits.flux_conditioning(1)
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    _, trajectory = invert(flux, latent, positive, positive, 6, scheduler="simple")
    sigmas, states = trajectory.sigmas, trajectory.latents
    for i in (0, 3, 5):  # the first (from sigma 0), a middle one and the one that reaches sigma 1
        expected = states[i] + (sigmas[i + 1] - sigmas[i]) * velocity(flux, states[i], sigmas[i + 1], positive)
        assert relative_error(states[i + 1], expected) < 1e-5
        # the velocity at the current sigma instead would be a different step
        other = states[i] + (sigmas[i + 1] - sigmas[i]) * velocity(flux, states[i], sigmas[i], positive)
        assert relative_error(states[i + 1], other) > 1e-3


def test_round_trip_on_a_tiny_flux_shrinks_with_the_steps(flux):
    positive = random_dits.flux_conditioning(1)
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    errors = {}
    for steps in (5, 20, 50):
        inverted, _ = invert(flux, latent, positive, positive, steps, scheduler="simple")
        errors[steps] = relative_error(sample_back(flux, inverted, positive, steps), latent)
    print(f"tiny Flux round trip, relative error: {errors}")
    # Measured 0.54, 0.15, 0.062 (0.8.0 and 0.3.75): 2.7 to 3.1 / steps, the first-order error of labelling
    # x_i with sigma_{i+1}, which depends on how fast the velocity changes with x (this random Flux: by
    # ~0.6 of a change in x). 4 / steps leaves a third of margin; a wrong step or label would not shrink.
    assert all(error < 4.0 / steps for steps, error in errors.items())
    assert errors[50] < errors[20] * (20 / 50) * 1.25 and errors[20] < errors[5] * (5 / 20) * 1.5
