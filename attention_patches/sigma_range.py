"""The part of the noise schedule a patch acts in."""

from dataclasses import dataclass


@dataclass(frozen=True)
class SigmaRange:
    """Active for sigma_end < sigma <= sigma_start; empty when the two are equal."""

    sigma_start: float
    sigma_end: float

    def contains(self, sigma: float) -> bool:
        return self.sigma_end < sigma <= self.sigma_start
