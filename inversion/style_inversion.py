"""STYLE_INVERSION: a real image inverted by StyleDiffusion, what prompt-to-prompt editing starts from
(pure: no comfy). The plain DDIM inversion's trajectory (cfg 1, the source prompt), the learned
value input of each sampling step, the source prompt and the settings, in one versioned file."""

import json
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..safetensors_file import write_atomically
from .ddim import InversionTrajectory

STYLE_INVERSION_FORMAT = "style-attention-nodes/style-inversion/1"


@dataclass(frozen=True)
class StyleInversion:
    trajectory: InversionTrajectory  # ascending sigmas from 0; latents[k] at sigmas[k]
    scales: torch.Tensor  # (steps, tokens, channels): step i runs from sigmas[steps - i] down
    shifts: torch.Tensor
    source_prompt: str
    settings: dict  # how it was made: steps, scheduler, guidance, iterations, ...
    losses: tuple[tuple[float, ...], ...] = ()  # each step's losses

    @property
    def steps(self) -> int:
        return self.scales.shape[0]

    @property
    def guidance(self) -> float:
        return float(self.settings["guidance"])

    def sampling_sigmas(self) -> torch.Tensor:
        """The descending schedule the learned steps run on (ends at 0)."""
        return self.trajectory.sigmas.flip(0)

    def step_index(self, sigma: float, tolerance: float = 1e-4) -> int | None:
        """Which sampling step starts at sigma (0: the noisiest); None off the schedule."""
        sigmas = self.sampling_sigmas()[:-1]
        distance = (sigmas - sigma).abs()
        index = int(distance.argmin())
        return None if distance[index] > tolerance * max(1.0, abs(sigma)) else index

    def value_at(self, sigma: float, tolerance: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (scale, shift) learned for the step that starts at sigma; None off the schedule."""
        index = self.step_index(sigma, tolerance)
        return None if index is None else (self.scales[index], self.shifts[index])


def check_consistent(inversion: StyleInversion, where: str) -> StyleInversion:
    trajectory = inversion.trajectory
    steps = len(trajectory.sigmas) - 1
    if inversion.scales.shape != inversion.shifts.shape or inversion.scales.ndim != 3 \
            or inversion.scales.shape[0] != steps or trajectory.latents.shape[0] != steps + 1:
        raise ValueError(f"{where}: inconsistent style inversion (sigmas {tuple(trajectory.sigmas.shape)}, latents "
                         f"{tuple(trajectory.latents.shape)}, scales {tuple(inversion.scales.shape)}, shifts "
                         f"{tuple(inversion.shifts.shape)})")
    return inversion


def save_style_inversion(inversion: StyleInversion, path: str) -> None:
    """Write to a .safetensors file atomically: a failed write leaves no partial file behind."""
    tensors = {"sigmas": inversion.trajectory.sigmas, "latents": inversion.trajectory.latents,
               "scales": inversion.scales, "shifts": inversion.shifts}
    metadata = {"format": STYLE_INVERSION_FORMAT, "source_prompt": inversion.source_prompt,
                "settings": json.dumps(inversion.settings), "losses": json.dumps([list(l) for l in inversion.losses])}
    write_atomically(tensors, path, metadata)


def load_style_inversion(path: str) -> StyleInversion:
    with safe_open(path, framework="pt") as archive:
        metadata = archive.metadata() or {}
        if metadata.get("format") != STYLE_INVERSION_FORMAT:
            raise ValueError(f"{path} is not a style inversion saved by Save Style Inversion")
        tensors = {name: archive.get_tensor(name) for name in ("sigmas", "latents", "scales", "shifts")}
    inversion = StyleInversion(InversionTrajectory(tensors["sigmas"], tensors["latents"]), tensors["scales"],
                               tensors["shifts"], metadata["source_prompt"], json.loads(metadata["settings"]),
                               tuple(tuple(l) for l in json.loads(metadata["losses"])))
    return check_consistent(inversion, path)
