"""Attention maps: capture them while sampling, then draw them as heatmaps over the images.

Capture works with any method of this pack (a styled layer records what it computes: for VSP where
each target position looks in the reference) and with a plain model, on a UNet or a Flux model (a
block's joint attention holds both kinds of map).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import comfy.ldm.modules.attention
import comfy.model_patcher
import comfy.patcher_extension
from comfy_api.latest import io

from ..attention_patches.attention import KernelAttention
from ..attention_patches.attention_maps import (
    ATTENTION_MAPS_OPTION,
    AttentionMapError,
    AttentionMapRecorder,
    CapturingAttention,
    MapCapture,
)
from ..attention_patches.heatmaps import draw_cross_attention, draw_self_attention
from ..glue.architectures import ADAPTERS, AUTO, LAYER_CHOICES, adapter_for, resolve_layers
from ..attention_patches.sigma_range import SigmaRange
from ..glue.schedule import active_sigma_range
from ..glue.site_patches import Claim, install_site_patches
from .io_types import AttentionMaps
from .style_inputs import layer_inputs


CAPTURE_WRAPPER_KEY = "style_attention_nodes.attention_maps"
KINDS = {"cross_attention": "cross", "self_attention": "self"}


@dataclass(frozen=True)
class ResetBeforeSampling:
    """OUTER_SAMPLE wrapper: each sampling run starts with empty maps (a rerun must not add to the last)."""

    recorder: AttentionMapRecorder

    def __call__(self, executor, *args, **kwargs):
        self.recorder.reset()
        return executor(*args, **kwargs)


@dataclass(frozen=True)
class ProvideCapture:
    """APPLY_MODEL wrapper: at a captured step, hands the capture to the attention layers through
    transformer_options (the step decided here, once per model call; on a DiT with the call's tokens)."""

    capture: MapCapture
    active_range: SigmaRange
    tokens: Callable | None = None  # a DiT adapter's token_grid(x, c_crossattn) -> TokenGrid; None on a UNet

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if not self.active_range.contains(float(t[0])):  # the one device-to-host read of the call
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        capture = self.capture if self.tokens is None else replace(self.capture, tokens=self.tokens(x, c_crossattn))
        options = {**transformer_options, ATTENTION_MAPS_OPTION: capture}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


CAPTURE_FOREIGN = ("{input_name}: {names} already has its {what} replaced by another node ({patch_type}); capture "
                   "before that node, or choose other layers")


def install_capture_patches(model: comfy.model_patcher.ModelPatcher, adapter, layers, kind: str) -> None:
    """A capturing patch per layer; a layer this pack already styles records by itself."""
    patch_name = adapter.map_kinds[kind]
    attention = KernelAttention.of(comfy.ldm.modules.attention.optimized_attention)
    # what plain attention attends to there: the prompt at a UNet's cross-attention; the image's own
    # positions at its self-attention and at a DiT's joint attention (whose text keys the recorder knows)
    plain_keys = ("text",) if patch_name == "attn2" else ("self",)
    patches = {layer: CapturingAttention(layer, attention, plain_keys) for layer in layers}
    install_site_patches(model, adapter, patches, patch_name,
                         Claim("CaptureAttentionMaps", takes_over=(), yields_to_styles=True, foreign=CAPTURE_FOREIGN))


class CaptureAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CaptureAttentionMaps",
            display_name="Capture Attention Maps",
            category="style_attention",
            description="Records softmax(q k^T / sqrt(d)) of the chosen layers while the model samples, averaged over "
            "heads and steps (memory does not grow with the steps). On Flux a block's joint attention holds both "
            "kinds: the image positions' attention to the prompt's tokens or to the image's positions, within one "
            "softmax. Connect the maps to Attention Map Heatmap.",
            inputs=[
                io.Model.Input("model", tooltip="The model to watch (plain or styled by this pack); it is cloned."),
                io.Combo.Input("attention", options=list(KINDS), default="self_attention",
                               tooltip="self_attention: where each position looks in the image (and in the style "
                               "reference, for VSP and StyleAligned). cross_attention: where each prompt token acts."),
                *layer_inputs(AUTO, "Which transformer layers to capture (the same names as the style nodes; on a "
                              "UNet cross-attention sits beside each self-attention). auto: late_self_attention on "
                              "a UNet, vital_blocks on Flux.", LAYER_CHOICES),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the schedule at which capture starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the schedule at which capture stops."),
                io.Int.Input("max_megabytes", default=1024, min=1, max=1 << 20,
                             tooltip="Memory the maps may take (system memory). Self-attention maps grow with the "
                             "square of the positions: a 512x512 SD1.5 image's finest layers take 64 MiB per image, "
                             "a 1024x1024 Flux image 64 MiB per block (cross-attention: 4 MiB with 256 T5 tokens)."),
            ],
            outputs=[io.Model.Output(), AttentionMaps.Output(display_name="attention_maps")],
        )

    @classmethod
    def execute(cls, model, attention, layers, custom_layers, start_percent, end_percent,
                max_megabytes) -> io.NodeOutput:
        if attention not in KINDS:
            raise ValueError(f"attention: expected one of {', '.join(KINDS)}, got {attention!r}")
        kind = KINDS[attention]
        adapter = adapter_for(model, "CaptureAttentionMaps", ADAPTERS)
        selected = resolve_layers(adapter, layers, custom_layers, "attention_maps")
        active_range = active_sigma_range(model, start_percent, end_percent)
        recorder = AttentionMapRecorder(kind, max_megabytes * 2**20, adapter=adapter)
        patched = model.clone()
        install_capture_patches(patched, adapter, selected, kind)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CAPTURE_WRAPPER_KEY,
                                     ResetBeforeSampling(recorder))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CAPTURE_WRAPPER_KEY,
                                     ProvideCapture(MapCapture(recorder, frozenset(selected)), active_range,
                                                    getattr(adapter, "token_grid", None)))
        return io.NodeOutput(patched, recorder)


def chosen_layers(recorder: AttentionMapRecorder, text: str) -> list:
    if not recorder.layers:
        raise AttentionMapError(
            "attention_maps: nothing was captured; sample with the MODEL from Capture Attention Maps (within its "
            "start/end percent) before drawing"
        )
    if not text.strip():
        return list(recorder.layers.values())
    selected = recorder.adapter.select(list(recorder.layers), text, "layers",
                                       "layers: {name} was not captured (captured: {layers})")
    return [recorder.layers[layer] for layer in selected]


def parse_tokens(text: str) -> list[int]:
    tokens = [part for part in text.replace(",", " ").split()]
    if not tokens or not all(part.isdigit() for part in tokens):
        raise ValueError(f"tokens: expected token positions such as 1, 2 (0 is the start token), got {text!r}")
    return [int(part) for part in tokens]


class AttentionMapHeatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttentionMapHeatmap",
            display_name="Attention Map Heatmap",
            category="style_attention",
            description="Draws captured attention maps over the images (blue low, red high), averaged over the "
            "chosen layers. Cross-attention: one panel per image. Self-attention: the image with the query point "
            "marked, then where that point looks, one panel per block of keys (its own image, the reference; each reference of a set, on one scale, so the "
            "mix shows).",
            inputs=[
                AttentionMaps.Input("attention_maps", tooltip="From Capture Attention Maps, after sampling."),
                io.Image.Input("images", tooltip="The decoded images of that sampling run (the whole batch)."),
                io.String.Input("layers", default="",
                                tooltip="Captured layers to average, e.g. output.3, output.4.1 (Flux: double.0, "
                                "single); empty: all captured."),
                io.String.Input("tokens", default="1",
                                tooltip="Cross-attention: prompt token positions whose maps are summed. SD: 0 is the "
                                "start token, a one-token word at the start of the prompt is 1. Flux: the T5 "
                                "prompt's tokens, with no start token (its first word is 0)."),
                io.Float.Input("query_x", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Self-attention: the position whose attention is drawn, as a fraction of the width."),
                io.Float.Input("query_y", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Self-attention: the position's fraction of the height (0 is the top)."),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="How strongly the heat colours cover the image."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="Self-attention with an external style reference: its decoded image, drawn "
                               "under the reference's panel (black without it). Several references (Combine Style "
                               "References): a batch of their images in the set's order, one panel each."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, attention_maps, images, layers, tokens, query_x, query_y, opacity,
                reference_image=None) -> io.NodeOutput:
        maps = chosen_layers(attention_maps, layers)
        if attention_maps.kind == "cross":
            return io.NodeOutput(draw_cross_attention(maps, images, parse_tokens(tokens), opacity))
        return io.NodeOutput(draw_self_attention(maps, images, query_x, query_y, opacity, reference_image))
