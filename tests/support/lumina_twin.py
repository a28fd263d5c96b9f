"""A diffusers Lumina2Transformer2DModel with the same weights as a ComfyUI Lumina 2 ModelPatcher (ComfyUI's NextDiT),
run the way ComfyUI runs it; and, as diffusers 0.35 has no Z-Image transformer and its Lumina 2 cannot be one,
ZImageTwin: its Lumina 2 blocks and embedders assembled the Z-Image way. The twins of scripts/random_dits.py's
tiny_lumina2 and tiny_z_image for the parity tests.

What each side does (float32, CPU):
- weights: NextDiT's keys renamed (to_diffusers; diffusers' single-file convert_lumina2_to_diffusers does the same
  for the full-size Lumina 2 only: its qkv split is hard-coded to 2304 / 768 rows); the fused qkv split by heads
  (q: heads, k and v: key/value heads: grouped-query attention on Lumina 2), ComfyUI 0.3.75's unused norm_final
  dropped. The QK RMSNorms: ComfyUI builds them without eps (torch's default, float32's eps), diffusers with 1e-5
  (5e-6 apart at the output): the twin takes ComfyUI's.
- timestep: ComfyUI's diffusion_model receives sigma (ModelSamplingDiscreteFlow, multiplier 1) and embeds
  (1 - sigma) * time_scale; diffusers' Lumina2Pipeline passes 1 - sigma. twin_denoise passes 1 - sigma.
- output: ComfyUI returns -(the transformer's output), Lumina2Pipeline negates it: twin_denoise returns -output.
- positions, RoPE on interleaved pairs over (caption, row, column) axes: ComfyUI puts caption token i at (i + 1, 0, 0)
  and the image token (r, c) at (caption rows + 1, r, c), padding rows at (0, 0, 0); diffusers' Lumina2RotaryPosEmbed
  at (i, 0, 0) and (caption rows, r, c): one shift of axis 0 for every row, which RoPE does not see on Lumina 2 (it
  would on Z-Image, whose padding rows sit at 0). ComfyPositions reads diffusers' own tables (of ComfyUI's rope_theta:
  diffusers hard-codes 10000) at ComfyUI's positions.
- masks: none (ComfyUI passes none to the main layers and, without a conditioning mask, none to the refiners).
- Z-Image (z_image_modulation, time_scale 1000, pad_tokens_multiple 32, rope_theta 256; no grouped keys) differs from
  diffusers' Lumina 2 in: the layers' and noise refiner's modulation is a Linear on the time embedding with no SiLU
  before it (LuminaRMSNormZero has one) and min(dim, 256) wide; the time embedding is 256 wide (diffusers:
  min(dim, 1024)), as is the final layer's modulation input; learned caption and image pad tokens (appended after
  the embedders up to a multiple of 32) that diffusers has no place for (its unpatchify reads every row after the
  caption as image); the time scale; the RoPE theta. On the tiny one (dim 256) only the SiLU, the pads, the scale
  and theta differ: the shapes coincide.
"""

import functools
import inspect
import re

import torch
from diffusers import Lumina2Transformer2DModel
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.transformers.transformer_lumina2 import Lumina2RotaryPosEmbed

import comfy.ldm.lumina.model
import comfy.supported_models
import random_dits
from random_dits import TEXT_DIM, tiny_lumina2, tiny_z_image

NEXTDIT_DEFAULTS = {name: p.default for name, p in inspect.signature(comfy.ldm.lumina.model.NextDiT).parameters.items()
                    if p.default is not inspect.Parameter.empty}
BLOCK_KEYS = {"attention.out.weight": "attn.to_out.0.weight", "attention.q_norm.weight": "attn.norm_q.weight",
              "attention.k_norm.weight": "attn.norm_k.weight", "attention_norm2.weight": "norm2.weight",
              "ffn_norm1.weight": "ffn_norm1.weight", "ffn_norm2.weight": "ffn_norm2.weight",
              **{f"feed_forward.w{i}.weight": f"feed_forward.linear_{i}.weight" for i in (1, 2, 3)}}
TOP_KEYS = {"t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
            "cap_embedder.1": "time_caption_embed.caption_embedder.1", "x_embedder": "x_embedder",
            "final_layer.linear": "norm_out.linear_2", "final_layer.adaLN_modulation.1": "norm_out.linear_1"}
TOP_KEYS = {f"{c}.{end}": f"{d}.{end}" for c, d in TOP_KEYS.items() for end in ("weight", "bias")}
TOP_KEYS.update({"cap_embedder.0.weight": "time_caption_embed.caption_embedder.0.weight", "x_pad_token": "x_pad_token",
                 "cap_pad_token": "cap_pad_token"})
UNUSED = ("norm_final.weight",)  # ComfyUI 0.3.75 builds it, never runs it (nor does diffusers' converter keep it)


def config_of(unet_config: dict) -> dict:
    """NextDiT's arguments: the unet_config over NextDiT's defaults; refuses what no twin computes."""
    config = {**NEXTDIT_DEFAULTS, **unet_config}
    if not config["qk_norm"] or config.get("clip_text_dim") is not None:
        raise ValueError("the twins have QK RMSNorms and no pooled text projection (NewBie)")
    if config["dim"] // config["n_heads"] != sum(config["axes_dims"]) or len(config["axes_dims"]) != 3:
        raise ValueError("RoPE over 3 axes spanning the head")
    return config


def is_z_image(config: dict) -> bool:
    return bool(config["z_image_modulation"] or config["pad_tokens_multiple"] or config["time_scale"] != 1.0)


def _diffusers_config(config: dict) -> dict:
    multiplier = config["ffn_dim_multiplier"]  # ComfyUI: hidden = int(m * dim); diffusers: int(m' * 4 * dim)
    multiplier = None if multiplier in (None, 4.0) else multiplier / 4
    return {"patch_size": config["patch_size"], "in_channels": config["in_channels"], "hidden_size": config["dim"],
            "num_layers": config["n_layers"], "num_refiner_layers": config["n_refiner_layers"],
            "num_attention_heads": config["n_heads"], "num_kv_heads": config["n_kv_heads"] or config["n_heads"],
            "multiple_of": config["multiple_of"], "ffn_dim_multiplier": multiplier, "norm_eps": config["norm_eps"],
            "axes_dim_rope": tuple(config["axes_dims"]), "axes_lens": tuple(config["axes_lens"]),
            "cap_feat_dim": config["cap_feat_dim"]}


def to_diffusers(comfy_state: dict, config: dict) -> dict:
    """NextDiT's state dict under diffusers' Lumina 2 names; a key it does not know raises."""
    heads, head_dim = config["n_heads"], config["dim"] // config["n_heads"]
    kv_heads = config["n_kv_heads"] or heads
    state = {}
    for key, value in comfy_state.items():
        block = re.fullmatch(r"((?:layers|noise_refiner|context_refiner)\.\d+\.)(.+)", key)
        rest = block and block[2]
        if block and rest == "attention.qkv.weight":
            parts = value.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
            state.update({f"{block[1]}attn.to_{n}.weight": part for n, part in zip("qkv", parts)})
        elif block and rest == "attention_norm1.weight":
            state[block[1] + ("norm1.weight" if key.startswith("context") else "norm1.norm.weight")] = value
        elif block and re.fullmatch(rf"adaLN_modulation\.{0 if config['z_image_modulation'] else 1}\.(weight|bias)",
                                    rest):
            state[f"{block[1]}norm1.linear.{rest.rsplit('.', 1)[1]}"] = value
        elif block and rest in BLOCK_KEYS:
            state[block[1] + BLOCK_KEYS[rest]] = value
        elif not block and key in TOP_KEYS:
            state[TOP_KEYS[key]] = value
        elif key not in UNUSED:
            raise KeyError(f"no diffusers name for ComfyUI's {key}")
    return state


class ComfyPositions(torch.nn.Module):
    """The twins' rope_embedder: diffusers' Lumina2RotaryPosEmbed tables (complex, (tokens, head dim / 2)) read at
    ComfyUI's positions; called as diffusers' Lumina 2 calls its rope_embedder."""

    def __init__(self, config: dict):
        super().__init__()
        self.table = Lumina2RotaryPosEmbed(config["rope_theta"], config["axes_dims"], config["axes_lens"],
                                           config["patch_size"])
        self.patch = config["patch_size"]

    def freqs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table._get_freqs_cis(ids[None])[0]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """diffusers' own patchify: (B, C, H, W) -> (B, H/p * W/p, C p p), row-major (the same as ComfyUI's)."""
        return self.table(x, torch.ones(x.shape[0], 1, dtype=torch.bool))[0]

    def forward(self, hidden_states, attention_mask):
        if not attention_mask.all():
            raise ValueError("ComfyUI runs the main layers without a caption mask")
        batch, _, height, width = hidden_states.shape
        caption, rows, cols = attention_mask.shape[1], height // self.patch, width // self.patch
        freqs = self.freqs(sequence_ids(caption, rows, cols))[None].expand(batch, -1, -1)
        return (self.patchify(hidden_states), freqs[:, :caption], freqs[:, caption:], freqs, [caption] * batch,
                [caption + rows * cols] * batch)


def image_ids(rows: int, cols: int, caption: int, w_offset: int = 0) -> torch.Tensor:
    """(rows * cols, 3): (caption rows + 1, row, column + w_offset) per image token, row-major (ComfyUI's)."""
    row = torch.arange(rows).repeat_interleave(cols)
    return torch.stack([torch.full_like(row, caption + 1), row, torch.arange(cols).repeat(rows) + w_offset], -1)


def sequence_ids(caption: int, rows: int, cols: int, pad: int = 0) -> torch.Tensor:
    """The joint sequence's positions: caption (i + 1, 0, 0), image, padding (0, 0, 0)."""
    text = torch.zeros(caption, 3, dtype=torch.long)
    text[:, 0] = torch.arange(1, caption + 1)
    return torch.cat([text, image_ids(rows, cols, caption), torch.zeros(pad, 3, dtype=torch.long)])


def padding(rows: int, multiple) -> int:
    return -rows % multiple if multiple else 0  # ComfyUI's pad_extra


class ZImageTwin(Lumina2Transformer2DModel):
    """diffusers' Lumina 2 embedders and blocks run the Z-Image way (see the module's docstring): caption and image
    padded with their pad tokens, no SiLU before the blocks' modulation, the timestep times time_scale."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None, return_dict=False):
        if encoder_attention_mask is not None and not encoder_attention_mask.all():
            raise ValueError("ComfyUI runs the main layers without a caption mask")
        batch, _, height, width = hidden_states.shape
        p, rows, cols = self.config.patch_size, height // self.config.patch_size, width // self.config.patch_size
        temb, caption = self.time_caption_embed(hidden_states, timestep * self.time_scale, encoder_hidden_states)
        image = self.x_embedder(self.rope_embedder.patchify(hidden_states))
        pads = padding(caption.shape[1], self.pad_tokens_multiple), padding(rows * cols, self.pad_tokens_multiple)
        if any(pads):
            caption = torch.cat([caption, self.cap_pad_token.expand(batch, pads[0], -1)], 1)
            image = torch.cat([image, self.x_pad_token.expand(batch, pads[1], -1)], 1)
        text = caption.shape[1]
        freqs = self.rope_embedder.freqs(sequence_ids(text, rows, cols, pads[1]))[None].expand(batch, -1, -1)
        for layer in self.context_refiner:
            caption = layer(caption, None, freqs[:, :text])
        for layer in self.noise_refiner:
            image = layer(image, None, freqs[:, text:], temb)
        joint = torch.cat([caption, image], 1)
        for layer in self.layers:
            joint = layer(joint, None, freqs, temb)
        out = self.norm_out(joint, temb)[:, text:text + rows * cols]
        out = out.reshape(batch, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, rows * p, cols * p)
        return (out,)


def _as_z_image(twin: ZImageTwin, config: dict) -> ZImageTwin:
    dim = config["dim"]
    twin.time_scale, twin.pad_tokens_multiple = config["time_scale"], config["pad_tokens_multiple"]
    if config["z_image_modulation"]:
        twin.time_caption_embed.timestep_embedder = TimestepEmbedding(256, min(dim, 1024), out_dim=256)
        for block in [*twin.noise_refiner, *twin.layers]:
            block.norm1.silu, block.norm1.linear = torch.nn.Identity(), torch.nn.Linear(min(dim, 256), 4 * dim)
        twin.norm_out.linear_1 = torch.nn.Linear(min(dim, 256), dim)
    if config["pad_tokens_multiple"]:
        twin.x_pad_token, twin.cap_pad_token = (torch.nn.Parameter(torch.zeros(1, dim)) for _ in range(2))
    return twin


def twin_from_comfy(model_patcher):
    """The diffusers twin of a ComfyUI Lumina 2 (Lumina2Transformer2DModel) or Z-Image (ZImageTwin) ModelPatcher: its
    diffusion model's own weights (without patches), float32, eval mode, rope_embedder ComfyPositions."""
    base = model_patcher.model
    config = config_of(base.model_config.unet_config)
    comfy_state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in base.diffusion_model.state_dict().items()}
    if is_z_image(config):
        twin = _as_z_image(ZImageTwin(**_diffusers_config(config)), config)
    else:
        twin = Lumina2Transformer2DModel(**_diffusers_config(config))
    state, expected = to_diffusers(comfy_state, config), twin.state_dict()
    if set(state) != set(expected):
        raise ValueError(f"key names differ: {sorted(set(state) ^ set(expected))}")
    wrong = [key for key in state if state[key].shape != expected[key].shape]
    if wrong:
        raise ValueError(f"shapes differ: {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong]}")
    twin.load_state_dict(state, strict=True)
    for block in [*twin.context_refiner, *twin.noise_refiner, *twin.layers]:  # ComfyUI's eps=None: float32's
        block.attn.norm_q.eps = block.attn.norm_k.eps = torch.finfo(torch.float32).eps
    twin.rope_embedder = ComfyPositions(config)
    return twin.eval()


@torch.no_grad()
def twin_denoise(twin, x: torch.Tensor, sigma, context: torch.Tensor) -> torch.Tensor:
    """What ComfyUI's diffusion_model(x, sigma, context, tokens) returns, computed by the twin: x (B, 16, H, W) as the
    model receives it (padded circularly to the patch, the output cropped), sigma a number or (B,)."""
    patch = twin.config.patch_size
    height, width = x.shape[-2:]
    padded = torch.nn.functional.pad(x.float(), (0, -width % patch, 0, -height % patch), mode="circular")
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0])
    out = twin(hidden_states=padded, timestep=1.0 - sigma, encoder_hidden_states=context.float(),
               encoder_attention_mask=torch.ones(context.shape[:2], dtype=torch.bool), return_dict=False)[0]
    return -out[..., :height, :width]


def tiny_lumina2_grouped(seed: int = 0):
    """tiny_lumina2 with 4 query heads on 2 key/value heads (head dim 16: RoPE axes 4 + 6 + 6), where the order in
    which grouped keys are repeated to the heads shows (tiny_lumina2's one key/value head hides it)."""
    config = random_dits.tiny_lumina2_config(n_heads=4, n_kv_heads=2, axes_dims=[4, 6, 6])
    patcher = random_dits.model_patcher(comfy.supported_models.Lumina2(config), seed)
    return random_dits._sharpened(patcher, seed, names=("q_norm.weight", "k_norm.weight"))


# The shared inputs of the Lumina twin, oracle and parity tests
BUILDERS = {"lumina2": tiny_lumina2, "z_image": tiny_z_image, "lumina2_grouped": tiny_lumina2_grouped}


@functools.cache
def build(name="lumina2"):
    model = BUILDERS[name](seed=4)
    return model, twin_from_comfy(model)


def inputs(batch, height, width, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, height, width, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, tokens, TEXT_DIM, generator=g))
