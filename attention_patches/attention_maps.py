"""Attention maps: softmax(q k^T / sqrt(d)), averaged over heads, summed over the captured steps.

The recorder keeps one running sum per layer (and a count), never a step's full per-head maps, so
memory is (images x query tokens x key tokens) per layer whatever the number of steps, checked
against a budget before anything is allocated. Only the cond images are captured.

On a DiT's joint attention (text rows first) one call holds both kinds of map: its image rows'
queries against the text keys (cross-attention: where each prompt token acts) and against the image
keys (self-attention); the softmax is the call's own, over all of its keys.
"""

import math
from dataclasses import dataclass, field

import torch

from .attention import AttentionFunction, for_call
from .layers import SelfAttentionLayer, layer_name
from .reference import batch_chunks
from .style_call import RECORDING_OPTION
from .token_layout import LAYOUT_OPTION, UNET_LAYOUT, TokenGrid

# The transformer_options entry through which the capture's wrapper reaches the attention layers.
ATTENTION_MAPS_OPTION = "style_attention_nodes.attention_maps"
QUERY_CHUNK = 1024  # query tokens per softmax: bounds the per-head scratch memory


class AttentionMapError(RuntimeError):
    pass


def head_averaged_probabilities(
    query: torch.Tensor, key: torch.Tensor, heads: int, bias: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, queries, heads * d) x (batch, keys, heads * d) -> (batch, queries, keys) in float32.

    bias (keys,) is added to the scores before the softmax, as the attention call itself does.
    columns (indices of keys): only those keys' probabilities are kept (the softmax is over all keys).
    """
    batch, queries, inner_dim = query.shape
    dim_head = inner_dim // heads
    q = query.float().reshape(batch, queries, heads, dim_head).transpose(1, 2)
    k = key.float().reshape(batch, -1, heads, dim_head).transpose(1, 2)
    kept = k.shape[2] if columns is None else len(columns)
    out = torch.empty(batch, queries, kept, dtype=torch.float32, device=query.device)
    for start in range(0, queries, QUERY_CHUNK):
        scores = q[:, :, start:start + QUERY_CHUNK] @ k.transpose(-1, -2) / math.sqrt(dim_head)
        if bias is not None:
            scores = scores + bias.float()
        probabilities = scores.softmax(dim=-1).mean(dim=1)
        out[:, start:start + QUERY_CHUNK] = probabilities if columns is None else probabilities[..., columns]
    return out


@dataclass(frozen=True)
class JointMaps:
    """What a map keeps of a DiT's joint attention call [text | image | extra] (extra: e.g. Kontext's
    reference-image rows): the image rows' queries, against the text keys (cross) or the image blocks
    of keys (self: the key_sources, each an image's rows; the call's extra rows follow the first block
    and are left out)."""

    text: int
    image: int
    cross: bool
    blocks: int  # how many blocks of image keys the call has (len(key_sources))

    @property
    def rows(self) -> slice:
        return slice(self.text, self.text + self.image)

    def columns(self, queries: int, keys: int, device) -> torch.Tensor:
        if self.cross:
            return torch.arange(self.text, device=device)
        extra = queries - self.text - self.image
        first = keys - self.text - extra - self.image * (self.blocks - 1)
        return torch.cat([torch.arange(self.text, self.text + first, device=device),
                          torch.arange(self.text + first + extra, keys, device=device)])


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
    layer: tuple = ()  # its site, for messages

    @property
    def name(self) -> str:
        return layer_name(*self.layer) if self.layer else "a layer"

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.calls


@dataclass
class AttentionMapRecorder:
    """Filled while sampling, read by the heatmap node; emptied when a sampling run starts."""

    kind: str  # "self" or "cross"
    max_bytes: int
    layers: dict[SelfAttentionLayer, LayerMaps] = field(default_factory=dict)
    adapter: object = None  # the model family's architecture adapter: reads the heatmap's layer names

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
                torch.zeros(probabilities.shape), 0, query_grid, first_image, key_sources, layer
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
    joint: JointMaps | None = None  # on a DiT's joint attention: the rows and columns kept
    recorded: bool = False

    def __call__(self, query, key, value, heads: int, attn_precision=None, bias: torch.Tensor | None = None):
        if not self.recorded:
            self.recorded = True
            queries, keys = query[self.images], key[self.images]
            columns = None
            if self.joint is not None:
                columns = self.joint.columns(queries.shape[1], keys.shape[1], query.device)
                queries = queries[:, self.joint.rows]
            probabilities = head_averaged_probabilities(queries, keys, heads, bias, columns)
            self.recorder.add(self.layer, probabilities, self.query_grid, self.first_image, self.key_sources)
        return self.attention(query, key, value, heads, attn_precision=attn_precision, bias=bias)


@dataclass(frozen=True)
class MapCapture:
    """What the capture's wrapper puts in transformer_options for a model call at a captured step:
    which layers record (the wrapper decides the step once per call; the layers never read the sigma),
    and on a DiT the call's tokens (read once per call, as a style's StyleCall carries them)."""

    recorder: AttentionMapRecorder
    layers: frozenset
    tokens: TokenGrid | None = None

    def recording(self, layer: SelfAttentionLayer, attention: AttentionFunction, extra_options: dict,
                  images: slice, first_image: int, key_sources: tuple[str, ...]) -> AttentionFunction:
        """attention itself, or a recording version of it when this layer and step are captured.

        A UNet layer's self- and cross-attention share its name: only the kind the capture is for
        records (cross-attention attends to the prompt, key_sources ("text",)). A DiT's joint attention
        (its call's layout has text rows) records the kind's rows and columns."""
        if layer not in self.layers or extra_options.get(RECORDING_OPTION) is not None:
            return attention
        cross = self.recorder.kind == "cross"
        layout = extra_options.get(LAYOUT_OPTION, UNET_LAYOUT)
        if not layout.whole_image and self.tokens is not None:
            joint = JointMaps(layout.text, self.tokens.height * self.tokens.width, cross, len(key_sources))
            return RecordingAttention(attention, self.recorder, layer, images, (self.tokens.height, self.tokens.width),
                                      first_image, ("text",) if cross else key_sources, joint)
        if cross != (key_sources == ("text",)):
            return attention
        height, width = extra_options["activations_shape"][-2:]
        return RecordingAttention(attention, self.recorder, layer, images, (height, width), first_image, key_sources)


def captured_tokens(extra_options: dict, site) -> TokenGrid | None:
    """The call's tokens where a capture asks for this DiT site in this call, else None."""
    capture = extra_options.get(ATTENTION_MAPS_OPTION)
    if capture is None or site not in capture.layers:
        return None
    return capture.tokens


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

    site: tuple
    attention: AttentionFunction
    key_sources: tuple[str, ...]  # ("self",) for self-attention, ("text",) for cross-attention

    def __call__(self, query, key, value, extra_options: dict) -> torch.Tensor:
        attention = with_capture(for_call(self.attention, extra_options), self.site, extra_options, self.key_sources,
                                 query.shape[0], extra_options["cond_or_uncond"])
        return attention(query, key, value, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))
