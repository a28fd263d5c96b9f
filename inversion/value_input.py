"""StyleDiffusion's inversion of a real image through the value input of cross-attention (pure: no comfy).

Walking down the schedule of a plain DDIM inversion (cfg 1, the source prompt), at each step the
step's modulation of the prompt's value input is trained so that one guided DDIM step from the
current latent lands on the inversion's latent one step down, with the cross-attention maps kept
close to the inversion's (the maps stay the prompt's, so prompt-to-prompt can edit them). As the
authors' stylediffusion.py: ceil(N e^(-0.1 i)) Adam iterations at step i (from the noisiest),
learning rate base (1 - i / 100), a fresh optimiser per step warm-started from the previous step's
parameters, the step ended early once its loss is below 1e-5 + 2e-5 i, and the next step starting
from the latent the optimised step reaches (not the inversion's).

What is trained is a modulation: the (scale, shift) tensors themselves (DirectModulation) or the
authors' mapping network from the image's CLIP vision tokens (mapping_network.NetworkModulation).

Latents are ComfyUI's sigma-space ones (x = x0 + sigma eps); the latent loss is taken on the
diffusers latent x / sqrt(1 + sigma^2) (latent_scale), where the authors' loss and early-stop
thresholds are stated.

Precision: the trained parameters stay float32 (master weights) and the loss is float32 whatever
dtype the model computes in. A model computing in float16 underflows the small gradients of late
steps to exactly 0, so with settings.loss_scaling the loss is scaled before backward and the
gradients unscaled in float32 before Adam, as torch.amp.GradScaler does (it is CUDA-bound; this
rule runs on any device): an iteration whose gradients overflow is skipped and the scale halved,
and the scale doubles after `growth_interval` finite iterations in a row.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

# step(x, sigma, parameters) -> (guided denoised x0, {layer: cond cross-attention maps}); parameters
# is the step's (scale, shift), read by the model's value-input patch
StepFunction = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, dict]]
SAME_LATENT, SAME_SIGMA = "same latent (authors' code)", "same sigma"
ATTENTION_TARGETS = (SAME_LATENT, SAME_SIGMA)


@dataclass(frozen=True)
class ValueInversionSettings:
    inner_iterations: int = 20  # N: the README's command (the code's default is 100)
    learning_rate: float = 1e-2
    attention_weight: float = 1.0
    early_stop: bool = True
    stop_epsilon: float = 1e-5
    stop_slope: float = 2e-5
    attention_target: str = SAME_LATENT
    loss_scaling: bool = False  # dynamic loss scaling, for a model computing in float16


@dataclass(frozen=True)
class LossScale:
    """Dynamic loss scaling's state: the factor and how many finite iterations ran since it changed."""

    value: float = 2.0 ** 16
    finite_run: int = 0
    growth_interval: int = 10  # GradScaler's 2000 would never grow within an inversion's few hundred

    def after(self, finite: bool) -> "LossScale":
        if not finite:
            return LossScale(self.value / 2, 0, self.growth_interval)
        if self.finite_run + 1 >= self.growth_interval:
            return LossScale(self.value * 2, 0, self.growth_interval)
        return LossScale(self.value, self.finite_run + 1, self.growth_interval)


def unscaled(parameters: list[torch.Tensor], scale: float) -> bool:
    """Divides each gradient (float32) by scale in place; False (gradients left as they are) where
    any is inf or NaN."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    if not bool(torch.stack([g.float().isfinite().all() for g in grads]).all()):
        return False
    for grad in grads:
        grad.div_(scale)
    return True


def iterations_at(settings: ValueInversionSettings, i: int) -> int:
    """Inner iterations at step i, counted from the noisiest: ceil(N e^(-0.1 i))."""
    return math.ceil(settings.inner_iterations * math.exp(-0.1 * i))


def learning_rate_at(settings: ValueInversionSettings, i: int) -> float:
    return settings.learning_rate * (1 - i / 100)


def stop_threshold(settings: ValueInversionSettings, i: int) -> float:
    return settings.stop_epsilon + settings.stop_slope * i


def ddim_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """DDIM (eta 0) from sigma to sigma_next < sigma in sigma space."""
    return x + (sigma_next - sigma) * (x - denoised) / sigma


def attention_target_index(settings: ValueInversionSettings, j: int, steps: int) -> int:
    """Which inversion step's maps step j (from sigma_j down) is held to. The inversion's step k took
    latent k to k + 1 with the model at sigma_(k+1). The authors' code pairs by latent: k = j (the
    model at the next sigma up), the top step repeating the last; 'same sigma' pairs k = j - 1."""
    if settings.attention_target == SAME_SIGMA:
        return j - 1
    if settings.attention_target != SAME_LATENT:
        raise ValueError(f"attention_target must be one of {', '.join(ATTENTION_TARGETS)}")
    return min(j, steps - 1)


def attention_loss(maps: dict, targets: dict) -> torch.Tensor:
    """Sum over layers of the MSE between maps (per head, every token), as the authors' code."""
    return sum(torch.nn.functional.mse_loss(maps[layer].float(), targets[layer].to(maps[layer]).float())
               for layer in targets)


class Modulation(Protocol):
    """What a step trains: a fresh Adam over parameters() of warm_started(), values() its (scale, shift)."""

    def warm_started(self) -> "Modulation":
        """The next step's trainable copy, starting where this one ended."""

    def parameters(self) -> list[torch.Tensor]: ...

    def values(self) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class DirectModulation:
    """The step's (scale, shift), each (tokens, channels), are the parameters."""

    scale: torch.Tensor
    shift: torch.Tensor

    def warm_started(self) -> "DirectModulation":
        return DirectModulation(self.scale.detach().clone().requires_grad_(True),
                                self.shift.detach().clone().requires_grad_(True))

    def parameters(self) -> list[torch.Tensor]:
        return [self.scale, self.shift]

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.shift


@dataclass(frozen=True)
class ValueInversionResult:
    parameters: list[tuple[torch.Tensor, torch.Tensor]]  # (scale, shift) per sampling step, noisiest first
    losses: list[list[float]]  # each step's losses, one per iteration run
    reconstruction: torch.Tensor  # the latent the learned steps reach at sigma 0


def invert_value_inputs(step: StepFunction, sigmas: torch.Tensor, latents: torch.Tensor, maps: list[dict],
                        initial: Modulation | tuple[torch.Tensor, torch.Tensor],
                        latent_scale: Callable[[torch.Tensor], torch.Tensor],
                        settings: ValueInversionSettings,
                        on_iteration: Callable[[int, int, float], None] | None = None) -> ValueInversionResult:
    """sigmas (ascending from 0), latents and maps: a plain DDIM inversion (latents[k] at sigmas[k],
    maps[k] the cond cross-attention maps of its step k); initial: the modulation the first step starts
    from (a (scale, shift) pair: DirectModulation). on_iteration(step, iteration, loss) after each update."""
    steps = len(sigmas) - 1
    x = latents[steps]
    modulation = DirectModulation(*initial) if isinstance(initial, tuple) else initial
    learned, losses = [], []
    loss_scale = LossScale() if settings.loss_scaling else None
    for i, j in enumerate(range(steps, 0, -1)):
        sigma, sigma_next = sigmas[j].to(x), sigmas[j - 1].to(x)
        target = latents[j - 1].to(x) * latent_scale(sigma_next)
        target_maps = maps[attention_target_index(settings, j, steps)] if settings.attention_weight else {}
        modulation = modulation.warm_started()
        optimizer = torch.optim.Adam(modulation.parameters(), lr=learning_rate_at(settings, i))
        step_losses = []
        for iteration in range(iterations_at(settings, i)):
            with torch.enable_grad():
                denoised, step_maps = step(x, sigma, modulation.values())
                reached = ddim_step(x, sigma, sigma_next, denoised) * latent_scale(sigma_next)
                loss = torch.nn.functional.mse_loss(reached.float(), target.float())
                if target_maps:
                    loss = loss + settings.attention_weight * attention_loss(step_maps, target_maps)
                optimizer.zero_grad(set_to_none=True)
                (loss if loss_scale is None else loss * loss_scale.value).backward()
            if loss_scale is None:
                optimizer.step()
            else:  # skip an iteration whose gradients overflowed, with a lower scale
                finite = unscaled(modulation.parameters(), loss_scale.value)
                if finite:
                    optimizer.step()
                loss_scale = loss_scale.after(finite)
            step_losses.append(float(loss.detach()))  # the iteration's one device sync: progress and early stop
            if on_iteration is not None:
                on_iteration(i, iteration, step_losses[-1])
            if settings.early_stop and step_losses[-1] < stop_threshold(settings, i):
                break
        with torch.no_grad():
            scale, shift = (value.detach() for value in modulation.values())
            denoised, _ = step(x, sigma, (scale, shift))
            x = ddim_step(x, sigma, sigma_next, denoised)
        learned.append((scale, shift))
        losses.append(step_losses)
    return ValueInversionResult(learned, losses, x)
