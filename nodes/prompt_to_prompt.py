"""StyleDiffusion's editing: prompt-to-prompt on a real image inverted by Prompt Embedding Inversion."""

import comfy.ldm.modules.attention
import torch
from comfy_api.latest import io

from ..attention_patches.attention import KernelAttention
from ..attention_patches.layers import coarsest_level_layers
from ..attention_patches.prompt_tokens import TokenError, chunk_ids, content_ids, word_positions
from ..attention_patches.prompt_to_prompt import EditSchedule
from ..attention_patches.token_alignment import EDIT_MODES, edit_maps
from ..glue.architectures import adapter_for
from ..glue.lora_fit import prediction_of, with_size
from ..glue.prompt_to_prompt import LocalBlend, edit_model, paired, run_edit
from ..glue.value_inversion import inversion_sigmas
from .io_types import StyleInversion
from .style_inputs import new_owner

LENGTH = 77  # one chunk: the learned value inputs are for the inverted prompt's 77 tokens


def prompt_ids(clip, text: str, name: str) -> dict:
    """{encoder: (ids from the start token to the end token, each word's own ids)} on the model's tokenizers."""
    tokens, empty = clip.tokenize(text), clip.tokenize("")
    alone = [clip.tokenize(word) for word in text.split()]  # each word tokenized once, for every encoder
    out = {}
    for encoder, chunks in tokens.items():
        chunks, blank = chunk_ids(chunks), chunk_ids(empty[encoder])[0]
        if len(chunks) > 1:
            raise TokenError(f"{name}: longer than one 77-token chunk; the inversion's value inputs cover one")
        end = blank[1]
        ids = chunks[0][:chunks[0].index(end, 1) + 1] if end in chunks[0][1:] else chunks[0]
        words = [content_ids(chunk_ids(word[encoder]), blank) for word in alone]
        if [t for word in words for t in word] != ids[1:-1]:
            raise TokenError(f"{name}: its words tokenize differently inside the prompt than alone; write plain "
                             "words separated by spaces (no (emphasis:1.2) or embeddings)")
        out[encoder] = (ids, words)
    return out


def word_ids(clip, text: str, encoder: str) -> list[int]:
    return content_ids(chunk_ids(clip.tokenize(text)[encoder]), chunk_ids(clip.tokenize("")[encoder])[0])


def parse_weights(text: str) -> list[tuple[str, float]]:
    pairs = []
    for item in filter(str.strip, text.split(",")):
        word, _, weight = item.rpartition(":")
        try:
            pairs.append((word.strip(), float(weight)))
        except ValueError:
            raise ValueError(f"reweight: {item.strip()!r} is not word:weight (e.g. 'fluffy:2, cat:0.5')") from None
        if not word.strip():
            raise ValueError(f"reweight: {item.strip()!r} names no word")
    return pairs


def one_per_encoder(results: dict, what: str):
    """The tokenizers of one model (SDXL: clip_l and clip_g) must agree on an alignment."""
    first = next(iter(results.values()))
    for encoder, result in results.items():
        if not all(torch.equal(a, b) for a, b in zip(result, first)):
            raise TokenError(f"{what}: the model's tokenizers ({', '.join(results)}) place the words differently")
    return first


def blend_words(clip, prompts: dict, words: list[str]) -> torch.Tensor:
    """(2, LENGTH): 1 at the source's blend words in row 0 and the target's in row 1."""
    rows = {}
    for encoder in prompts["source"]:
        row = torch.zeros(2, LENGTH)
        for index, (name, text) in enumerate(zip(("source", "target"), words)):
            for word in filter(str.strip, text.split(",")):
                row[index, word_positions([prompts[name][encoder][0]], word_ids(clip, word.strip(), encoder),
                                          f"blend_{name}_words: {word.strip()!r}")] = 1.0
        rows[encoder] = (row,)
    return one_per_encoder(rows, "blend words")[0]


TEXT_KEYS = ("pooled_output",)  # what the edit's own prompts decide


def with_extras_of(conditioning, control, name: str):
    """conditioning with the extras (a ControlNet, ...) of control's one entry; its text left out."""
    if control is None:
        return conditioning
    if len(control) != 1:
        raise ValueError(f"{name}: expected one conditioning entry (one prompt through Apply ControlNet), got "
                         f"{len(control)}")
    extras = {key: value for key, value in control[0][1].items() if key not in TEXT_KEYS}
    return [[embedding, {**own, **extras}] for embedding, own in conditioning]


def check_inversion(model, inversion, positive) -> None:
    channels = model.get_model_object("latent_format").latent_channels
    latents, width = inversion.trajectory.latents, positive[0][0].shape[-1]
    if latents.shape[2] != channels or inversion.scales.shape[-1] != width:
        raise ValueError(f"style_inversion: made with a model of {latents.shape[2]}-channel latents and "
                         f"{inversion.scales.shape[-1]}-wide text embeddings; this model has {channels} and {width}")
    settings = inversion.settings
    expected = inversion_sigmas(model, settings["scheduler"], settings["steps"])
    if prediction_of(model) != settings.get("prediction", "eps") or expected.shape != inversion.trajectory.sigmas.shape \
            or not torch.allclose(expected.float(), inversion.trajectory.sigmas.float(), rtol=1e-4, atol=1e-6):
        raise ValueError("style_inversion: made with another model's noise schedule or prediction type; edit with "
                         "the model it was inverted with")


class PromptToPromptEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        fraction = dict(min=0.0, max=1.0, step=0.05)
        return io.Schema(
            node_id="PromptToPromptEdit",
            display_name="Prompt-to-Prompt Edit (StyleDiffusion)",
            category="style_attention/stylediffusion",
            description="Edits the inverted real image by changing words of its prompt: samples the source prompt "
            "(with the learned value inputs, which reconstruct the image) and the target prompt as one pair from the "
            "inverted latent, on the inversion's steps and cfg, the target's attention maps taken from the source's "
            "for the first part of the steps. With the source prompt it reconstructs the image.",
            inputs=[
                io.Model.Input("model", tooltip="The model the image was inverted with. Not modified."),
                io.Clip.Input("clip", tooltip="Encodes the target prompt (and the inversion's source prompt)."),
                StyleInversion.Input("style_inversion", tooltip="From Prompt Embedding Inversion or Load Style Inversion."),
                io.String.Input("target_prompt", default="a tiger sitting on a wall", multiline=True,
                                tooltip="The source prompt with words changed: replace swaps words one for one, "
                                "refine adds words, reweight keeps the words and changes their weight."),
                io.Combo.Input("edit_mode", options=list(EDIT_MODES), default="replace",
                               tooltip="replace: as many words as the source, some swapped; refine: words added "
                               "(aligned token by token); reweight: refine with the weights below required."),
                io.String.Input("reweight", default="",
                                tooltip="Optional 'word:weight, ...' of target words, scaling their attention "
                                "while cross-attention is replaced (e.g. 'snowy:2'); any edit mode."),
                io.Float.Input("tau_v", default=0.5, **fraction,
                               tooltip="Fraction of the steps in which the target also takes the learned value "
                               "inputs (the source always does)."),
                io.Float.Input("tau_c", default=0.6, **fraction,
                               tooltip="Fraction of the steps in which the target's cross-attention maps are the "
                               "source's (through the word alignment)."),
                io.Float.Input("tau_s", default=0.6, **fraction,
                               tooltip="Fraction of the steps in which the target's self-attention maps are the "
                               "source's (cond branch; all levels but the finest)."),
                io.Float.Input("tau_u", default=0.0, **fraction,
                               tooltip="Same for the uncond branch's self-attention: raise to 0.5 when the edit "
                               "changes the structure a lot (StyleDiffusion's README)."),
                io.String.Input("blend_source_words", default="",
                                tooltip="Local blend: comma-separated source words whose region may change; "
                                "outside the source's and target's word regions the image stays. Empty: off."),
                io.String.Input("blend_target_words", default="", tooltip="Local blend: target words (e.g. 'tiger')."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Local blend: a region is where a word's attention is above this share "
                               "of its peak."),
                io.Conditioning.Input("control_positive", optional=True,
                                      tooltip="Optional: a conditioning that went through Apply ControlNet (or sets "
                                      "other extras); its ControlNet and extras act on the edit's pair. Its text "
                                      "is not used: the prompts above are."),
                io.Conditioning.Input("control_negative", optional=True,
                                      tooltip="Optional: the same for the empty prompt's branch (Apply ControlNet's "
                                      "negative output)."),
            ],
            outputs=[io.Latent.Output(display_name="edited"), io.Latent.Output(display_name="reconstruction")],
        )

    @classmethod
    def execute(cls, model, clip, style_inversion, target_prompt, edit_mode, reweight, tau_v, tau_c, tau_s, tau_u,
                blend_source_words, blend_target_words, blend_threshold, control_positive=None,
                control_negative=None) -> io.NodeOutput:
        if not target_prompt.strip():
            raise ValueError("target_prompt: empty; write the source prompt with the words you want changed")
        source_prompt = style_inversion.source_prompt
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(source_prompt))
        check_inversion(model, style_inversion, positive)
        prompts = {"source": prompt_ids(clip, source_prompt, "style_inversion's source prompt"),
                   "target": prompt_ids(clip, target_prompt, "target_prompt")}
        weights = parse_weights(reweight)
        edits = {}
        for encoder, (target, target_words) in prompts["target"].items():
            source, source_words = prompts["source"][encoder]
            edit = edit_maps(edit_mode, source, target, source_words, target_words,
                             [(word_ids(clip, word, encoder), weight) for word, weight in weights], LENGTH)
            edits[encoder] = (edit.source_map, edit.own if edit.own is not None else torch.zeros(0))
        one_per_encoder(edits, "edit_mode")  # then any encoder's edit is the edit
        sites = list(adapter_for(model, "PromptToPromptEdit").sites)
        blend = None
        if blend_source_words.strip() or blend_target_words.strip():
            blend = LocalBlend(blend_words(clip, prompts, [blend_source_words, blend_target_words]),
                               tuple(coarsest_level_layers(sites)), blend_threshold)
        schedule = EditSchedule(style_inversion.steps, tau_v, tau_c, tau_s, tau_u)
        attention = KernelAttention.of(comfy.ldm.modules.attention.optimized_attention)
        patched, maps = edit_model(model, style_inversion, schedule, edit, sites, new_owner("PromptToPromptEdit"),
                                   attention, blend)
        samples = style_inversion.trajectory.top
        height, width = samples.shape[-2] * 8, samples.shape[-1] * 8
        target = clip.encode_from_tokens_scheduled(clip.tokenize(target_prompt))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        pair = with_size(with_extras_of(paired(positive, target), control_positive, "control_positive"), height, width)
        negative = with_size(with_extras_of(negative, control_negative, "control_negative"), height, width)
        out = run_edit(patched, style_inversion, pair, negative, blend, maps, model.get_model_object("latent_format"))
        return io.NodeOutput({"samples": out[1:]}, {"samples": out[:1]})
