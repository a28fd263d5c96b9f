"""Attention maps: softmax(q k^T / sqrt(d)), averaged over heads, summed over the captured steps.

The recorder keeps one running sum per layer (and a count), never a step's full per-head maps, so
memory is (images x query tokens x key tokens) per layer whatever the number of steps, checked
against a budget before anything is allocated. Only the cond images are captured.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import AttentionFunction, for_call
from .layers import SelfAttentionLayer, layer_name
from .reference import batch_chunks
from .style_call import RECORDING_OPTION
from .sigma_range import SigmaRange

# The transformer_options entry through which the capture's wrapper reaches the attention layers.
ATTENTION_MAPS_OPTION = "style_attention_nodes.attention_maps"
QUERY_CHUNK = 1024  # query tokens per softmax: bounds the per-head scratch memory


class AttentionMapError(RuntimeError):
    pass


def head_averaged_probabilities(
    query: torch.Tensor, key: torch.Tensor, heads: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(batch, queries, heads * d) x (batch, keys, heads * d) -> (batch, queries, keys) in float32.

    bias (keys,) is added to the scores before the softmax, as the attention call itself does.
    """
    batch, queries, inner_dim = query.shape
    dim_head = inner_dim // heads
    q = query.float().reshape(batch, queries, heads, dim_head).transpose(1, 2)
    k = key.float().reshape(batch, -1, heads, dim_head).transpose(1, 2)
    out = torch.empty(batch, queries, k.shape[2], dtype=torch.float32, device=query.device)
    for start in range(0, queries, QUERY_CHUNK):
        scores = q[:, :, start:start + QUERY_CHUNK] @ k.transpose(-1, -2) / math.sqrt(dim_head)
        if bias is not None:
            scores = scores + bias.float()
        out[:, start:start + QUERY_CHUNK] = scores.softmax(dim=-1).mean(dim=1)
    return out


@dataclass
class LayerMaps:
    """One layer's maps, summed over the captured calls.

    first_image: the batch position of the first captured image (1 with an in-batch reference, whose
    own attention is not captured). key_sources: what the keys are, in order, each a block of equal
    size: "self" (the image's own positions), "reference" (the style reference's), "text" (prompt tokens).
    """

    total: torch.Tensor  # (images, queries, keys)
    calls: int
    query_grid: tuple[int, int]  # (height, width) of the query positions
    first_image: int
    key_sources: tuple[str, ...]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.calls


@dataclass
class AttentionMapRecorder:
    """Filled while sampling, read by the heatmap node; emptied when a sampling run starts."""

    kind: str  # "self" or "cross"
    max_bytes: int
    layers: dict[SelfAttentionLayer, LayerMaps] = field(default_factory=dict)

    def reset(self) -> None:
        self.layers.clear()

    @property
    def bytes(self) -> int:
        return sum(maps.total.numel() * maps.total.element_size() for maps in self.layers.values())

    def add(self, layer: SelfAttentionLayer, probabilities: torch.Tensor, query_grid: tuple[int, int],
            first_image: int, key_sources: tuple[str, ...]) -> None:
        maps = self.layers.get(layer)
        if maps is None or maps.total.shape != probabilities.shape:
            needed = probabilities.numel() * 4
            held = self.bytes - (0 if maps is None else maps.total.numel() * 4)
            if held + needed > self.max_bytes:
                raise AttentionMapError(
                    f"the attention maps of layer {layer_name(*layer)} need {needed / 2**20:.1f} MiB, past "
                    f"max_megabytes ({self.max_bytes / 2**20:.0f} MiB, {held / 2**20:.1f} MiB already held): raise "
                    "max_megabytes, or capture fewer or coarser layers"
                )
            maps = self.layers[layer] = LayerMaps(
                torch.zeros(probabilities.shape), 0, query_grid, first_image, key_sources
            )
        maps.total += probabilities.cpu()
        maps.calls += 1


@dataclass
class RecordingAttention:
    """An attention function that records its first call's maps for the images in `images`.

    Only the first call: a method that also computes a plain attention (VSP below strength 1) calls
    the styled one first.
    """

    attention: AttentionFunction
    recorder: AttentionMapRecorder
    layer: SelfAttentionLayer
    images: slice
    query_grid: tuple[int, int]
    first_image: int
    key_sources: tuple[str, ...]
    recorded: bool = False

    def __call__(self, query, key, value, heads: int, attn_precision=None, bias: torch.Tensor | None = None):
        if not self.recorded:
            self.recorded = True
            probabilities = head_averaged_probabilities(query[self.images], key[self.images], heads, bias)
            self.recorder.add(self.layer, probabilities, self.query_grid, self.first_image, self.key_sources)
        return self.attention(query, key, value, heads, attn_precision=attn_precision, bias=bias)


@dataclass(frozen=True)
class MapCapture:
    """What the capture wrapper puts in transformer_options: which layers and steps to record."""

    recorder: AttentionMapRecorder
    layers: frozenset
    active_range: SigmaRange

    def recording(self, layer: SelfAttentionLayer, attention: AttentionFunction, extra_options: dict,
                  images: slice, first_image: int, key_sources: tuple[str, ...]) -> AttentionFunction:
        """attention itself, or a recording version of it when this layer and step are captured."""
        if (layer not in self.layers or extra_options.get(RECORDING_OPTION) is not None
                or not self.active_range.contains(float(extra_options["sigmas"][0]))):
            return attention
        height, width = extra_options["activations_shape"][-2:]
        return RecordingAttention(attention, self.recorder, layer, images, (height, width), first_image, key_sources)


def cond_images(batch_size: int, cond_or_uncond: list[int]) -> slice | None:
    """The batch slice of the cond chunk, or None when this call carries none."""
    for chunk, kind in zip(batch_chunks(batch_size, cond_or_uncond), cond_or_uncond):
        if kind == 0:
            return chunk
    return None


def with_capture(attention: AttentionFunction, layer: SelfAttentionLayer, extra_options: dict,
                 key_sources: tuple[str, ...], batch_size: int, cond_or_uncond: list[int],
                 first_image: int = 0) -> AttentionFunction:
    """attention itself, or a version recording the maps of the call's cond images when a capture in
    extra_options asks for this layer at this step. Nothing is computed when no capture is installed."""
    capture = extra_options.get(ATTENTION_MAPS_OPTION)
    if capture is None:
        return attention
    images = cond_images(batch_size, cond_or_uncond)
    if images is None:
        return attention
    return capture.recording(layer, attention, extra_options, images, first_image, key_sources)


@dataclass(frozen=True)
class CapturingAttention:
    """An attn1 or attn2 replace patch that only captures: the layer computes ComfyUI's attention."""

    layer: SelfAttentionLayer
    attention: AttentionFunction
    key_sources: tuple[str, ...]  # ("self",) for self-attention, ("text",) for cross-attention

    def __call__(self, query, key, value, extra_options: dict) -> torch.Tensor:
        attention = with_capture(for_call(self.attention, extra_options), self.layer, extra_options, self.key_sources,
                                 query.shape[0], extra_options["cond_or_uncond"])
        return attention(query, key, value, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))


def query_index(query_grid: tuple[int, int], x: float, y: float) -> int:
    """The query position nearest to the point (x, y), each a fraction of the image's width/height."""
    height, width = query_grid
    return min(int(y * height), height - 1) * width + min(int(x * width), width - 1)


def normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each map (first dimension) scaled to [0, 1]; a constant map becomes 0."""
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
    return ((flat - low[:, None]) / span[:, None]).reshape(maps.shape)


def resized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, h, w) -> (n, height, width), bilinear."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def colormap(values: torch.Tensor) -> torch.Tensor:
    """(...) in [0, 1] -> (..., 3) RGB: blue (low) through cyan, yellow to red (high)."""
    v = values.clamp(0, 1)[..., None]
    centres = torch.tensor([0.75, 0.5, 0.25], dtype=values.dtype, device=values.device)
    return (1.5 - (4 * (v - centres)).abs()).clamp(0, 1)


def overlay(images: torch.Tensor, heat: torch.Tensor, opacity: float) -> torch.Tensor:
    """images (n, H, W, 3) in [0, 1], heat (n, H, W) in [0, 1] -> the heat's colours blended over them."""
    return torch.lerp(images, colormap(heat), opacity)


def _consistent(maps: list[LayerMaps]) -> LayerMaps:
    first = maps[0]
    for other in maps[1:]:
        if (other.first_image, other.key_sources, other.total.shape[0]) != (first.first_image, first.key_sources,
                                                                            first.total.shape[0]):
            raise AttentionMapError(
                "the chosen layers were captured differently (some styled by another method or reference); "
                "choose layers styled alike"
            )
    return first


def cross_attention_heat(maps: list[LayerMaps], tokens: list[int], size: tuple[int, int]) -> torch.Tensor:
    """How strongly each position attends to the chosen prompt tokens, averaged over layers: (images, H, W)."""
    _consistent(maps)
    heats = []
    for layer in maps:
        if max(tokens) >= layer.total.shape[-1]:
            raise AttentionMapError(f"tokens: {max(tokens)} is past the prompt's {layer.total.shape[-1]} tokens")
        chosen = layer.mean[..., tokens].sum(dim=-1).reshape(-1, *layer.query_grid)
        heats.append(normalised(resized(chosen, size)))
    return torch.stack(heats).mean(dim=0)


def self_attention_heat(maps: list[LayerMaps], x: float, y: float, size: tuple[int, int]) -> list[torch.Tensor]:
    """Where the position (x, y) of each image looks, one (images, H, W) map per block of keys (key_sources)."""
    sources = _consistent(maps).key_sources
    per_source = [[] for _ in sources]
    for layer in maps:
        row = layer.mean[:, query_index(layer.query_grid, x, y)]
        height, width = layer.query_grid
        if row.shape[-1] != len(sources) * height * width:
            raise AttentionMapError(
                f"the keys ({row.shape[-1]}) are not {len(sources)} block(s) of the image's {height}x{width} "
                "positions: a reference of another size than the images cannot be drawn"
            )
        for heats, block in zip(per_source, row.reshape(row.shape[0], len(sources), height, width).unbind(1)):
            heats.append(resized(block, size))
    blocks = torch.stack([torch.stack(heats).mean(dim=0) for heats in per_source], dim=1)  # (images, blocks, H, W)
    # one scale per image across its blocks, so the share of attention each block takes shows
    return list(normalised(blocks).unbind(dim=1))


def mark_point(images: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """A white cross with a black outline at (x, y) (fractions of width and height) on (n, H, W, 3) images."""
    marked = images.clone()
    height, width = images.shape[1:3]
    row, column = min(int(y * height), height - 1), min(int(x * width), width - 1)
    arm = max(2, min(height, width) // 32)
    for colour, thickness in ((0.0, 1), (1.0, 0)):
        rows = slice(max(row - thickness, 0), row + thickness + 1)
        columns = slice(max(column - thickness, 0), column + thickness + 1)
        marked[:, rows, max(column - arm, 0):column + arm + 1] = colour
        marked[:, max(row - arm, 0):row + arm + 1, columns] = colour
    return marked


def captured_images(maps: list[LayerMaps], images: torch.Tensor) -> torch.Tensor:
    """The images the maps belong to, out of the sampling run's whole batch (n, H, W, 3)."""
    first, count = maps[0].first_image, maps[0].total.shape[0]
    if images.shape[0] < first + count:
        raise ValueError(
            f"images: the maps cover batch items {first} to {first + count - 1}, but the batch has "
            f"{images.shape[0]} images; connect the images of the sampling run that was captured"
        )
    return images[first:first + count].float()


def draw_cross_attention(maps: list[LayerMaps], images: torch.Tensor, tokens: list[int], opacity: float) -> torch.Tensor:
    """Each captured image with the heat of the chosen prompt tokens over it."""
    targets = captured_images(maps, images)
    return overlay(targets, cross_attention_heat(maps, tokens, tuple(targets.shape[1:3])), opacity)


def draw_self_attention(maps: list[LayerMaps], images: torch.Tensor, x: float, y: float, opacity: float,
                        reference_image: torch.Tensor | None = None) -> torch.Tensor:
    """Per captured image, side by side: the image with (x, y) marked, then where that point looks,
    one panel per block of keys over what those keys are (the image itself, or the reference)."""
    targets = captured_images(maps, images)
    size = tuple(targets.shape[1:3])
    backgrounds = {"self": targets, "reference": reference_background(maps, images, reference_image, size)}
    heats = self_attention_heat(maps, x, y, size)
    panels = [mark_point(targets, x, y)]
    panels += [overlay(backgrounds[source], heat, opacity) for source, heat in zip(maps[0].key_sources, heats)]
    return torch.cat(panels, dim=2)


def reference_background(maps: list[LayerMaps], images: torch.Tensor, reference_image: torch.Tensor | None,
                         size: tuple[int, int]) -> torch.Tensor:
    """The reference under its keys' panel: batch item 0 for an in-batch reference, else reference_image
    resized to the images' size, else black."""
    count = maps[0].total.shape[0]
    if maps[0].first_image == 1:
        reference = images[:1]
    elif reference_image is not None:
        reference = reference_image[:1]
    else:
        return torch.zeros(count, *size, 3)
    reference = resized(reference.float().movedim(-1, 1).flatten(0, 1), size).reshape(1, 3, *size).movedim(1, -1)
    return reference.expand(count, -1, -1, -1)
