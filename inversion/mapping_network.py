"""StyleDiffusion's mapping network (Li et al. 2023; the authors' clip_util.py and Trainer): one real
image's CLIP vision tokens turned into a step's per-token scale and shift of the prompt's value input
(pure: no comfy).

The authors feed ViT-B/16's 197 tokens of 768 (after ln_post, no projection) as the channels of 1-d
convolutions along the feature axis: conv_start Conv1d(197 -> 2T, 1), one block Conv1d(2T, 2T, 1) +
BatchNorm1d(2T) + LeakyReLU, conv_end Conv1d(2T, 2T, 1), T = 77 prompt tokens; the output's first T
rows are the scale and the last T the shift. Their modules stay in train mode, so BatchNorm always
normalises with the statistics of the one image (per channel, over the feature axis): here it keeps
no running statistics and does that in any mode.

Ours: the input token count is the vision model's (ViT-L/14 257, ViT-H, bigG, ...), and when its width
differs from the UNet's context width C (768 SD1.5, 1024 SD2, 2048 SDXL) a Linear(width -> C) on the
feature axis comes first (the authors rely on ViT-B/16's 768 being SD1.5's 768).
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn


class MappingNetwork(nn.Module):
    def __init__(self, vision_tokens: int, vision_width: int, prompt_tokens: int, channels: int):
        super().__init__()
        rows = 2 * prompt_tokens
        self.prompt_tokens = prompt_tokens
        self.to_channels = nn.Linear(vision_width, channels) if vision_width != channels else nn.Identity()
        self.conv_start = nn.Conv1d(vision_tokens, rows, kernel_size=1)
        self.conv_block = nn.Sequential(nn.Conv1d(rows, rows, kernel_size=1),
                                        nn.BatchNorm1d(rows, affine=True, track_running_stats=False),
                                        nn.LeakyReLU())
        self.conv_end = nn.Conv1d(rows, rows, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (1, vision tokens, vision width) -> (scale, shift), each (prompt tokens, channels)."""
        out = self.conv_end(self.conv_block(self.conv_start(self.to_channels(tokens))))
        return out[0, :self.prompt_tokens], out[0, self.prompt_tokens:]


def mapping_network(tokens: torch.Tensor, prompt_tokens: int, channels: int, seed: int = 0) -> MappingNetwork:
    """A network for tokens (1, n, width), PyTorch's default initialisation drawn under seed (the
    global generator left as it was), on tokens' device, float32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = MappingNetwork(tokens.shape[1], tokens.shape[2], prompt_tokens, channels)
    return network.to(tokens.device)


@dataclass(frozen=True)
class NetworkModulation:
    """The mapping network's weights are the parameters; (scale, shift) is its output for the image."""

    network: MappingNetwork
    tokens: torch.Tensor  # (1, vision tokens, vision width), constant

    def warm_started(self) -> "NetworkModulation":
        return NetworkModulation(copy.deepcopy(self.network).requires_grad_(True), self.tokens)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.network.parameters())

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network(self.tokens)
