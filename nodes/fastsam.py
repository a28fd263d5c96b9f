"""FastSAM Loader and FastSAM Segment (DiffStyler's mask prompts): masks of the content image chosen
by boxes, points, segment numbers or a word (through the diffusion model's own cross-attention)."""

import os

import torch

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..attention_patches.heatmaps import cross_attention_heat
from ..attention_patches.prompt_tokens import chunk_ids, content_ids, word_positions
from ..mask.fastsam import DEFAULTS, FastSAMError, load_fastsam
from ..mask.preview import preview
from ..mask.segments import (by_attention, by_boxes, by_indices, by_points, by_similarity, largest_first,
                             segment_crops)
from .attention_maps import chosen_layers
from .io_types import AttentionMaps, FastSAM

FOLDER = "fastsam"
SUBFOLDERS = ("fastsam", "ultralytics")
PROMPTS = ("everything", "boxes", "points", "text")


def register_model_folders() -> None:
    """models/fastsam and models/ultralytics (where other packs keep ultralytics models), .pt files."""
    for sub in SUBFOLDERS:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, sub))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | {".pt"})


def missing_model_text() -> str:
    return f"(none found: put FastSAM-s.pt or FastSAM-x.pt in models/{SUBFOLDERS[0]})"


def trusted_path(name: str) -> str:
    """The file's path, if it is a regular file inside one of the registered folders (no '..', no link out)."""
    listed = folder_paths.get_filename_list(FOLDER)
    folders = folder_paths.get_folder_paths(FOLDER)
    if name not in listed:
        raise FastSAMError(f"model_name: {name!r} is not a FastSAM model in {', '.join(folders)}; put FastSAM-s.pt or "
                           "FastSAM-x.pt (from the FastSAM authors or ultralytics) there and refresh")
    path = folder_paths.get_full_path(FOLDER, name)
    real = os.path.realpath(path) if path else ""
    inside = any(real.startswith(os.path.realpath(folder) + os.sep) for folder in folders)
    if not (path and inside and os.path.isfile(real)):
        raise FastSAMError(f"model_name: {name} is not a regular file inside {', '.join(folders)} (a link out of the "
                           "folder is refused: a .pt runs code when it loads)")
    return real


class FastSAMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list(FOLDER) or [missing_model_text()]
        return io.Schema(
            node_id="FastSAMLoader",
            display_name="FastSAM Loader",
            category="style_attention/diffstyler",
            description="Loads a FastSAM model (FastSAM-s.pt or FastSAM-x.pt) from models/fastsam or "
            "models/ultralytics through ultralytics, offline. A .pt runs code when it loads: use files from a "
            "source you trust.",
            inputs=[io.Combo.Input("model_name", options=files,
                                   tooltip="A .pt in models/fastsam or models/ultralytics.")],
            outputs=[FastSAM.Output()],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        return io.NodeOutput(load_fastsam(trusted_path(model_name), model_name))


def numbers(text: str, per_item: int, name: str) -> list[tuple[float, ...]]:
    """Groups of per_item numbers, one group per line or ';' (e.g. 'x1, y1, x2, y2')."""
    groups = []
    for part in text.replace(";", "\n").splitlines():
        if not part.strip():
            continue
        values = part.replace(",", " ").split()
        try:
            group = tuple(float(v) for v in values)
        except ValueError:
            group = ()
        if len(group) != per_item:
            raise ValueError(f"{name}: {part.strip()!r} is not {per_item} numbers (pixels of the image)")
        groups.append(group)
    return groups


def word_heats(attention_maps, clip, attention_prompt: str, words: list[str], size: tuple[int, int]) -> list:
    """Per word: its cross-attention heat over the image (images, H, W), summed over its tokens."""
    if attention_maps is None or clip is None:
        raise ValueError("text: connect attention_maps (Capture Attention Maps, cross, on a run over this image such as "
                         "its DDIM inversion) and the clip that encoded attention_prompt")
    if attention_maps.kind != "cross":
        raise ValueError("attention_maps: captured self-attention; text needs cross-attention maps")
    encoder = lambda text: next(iter(clip.tokenize(text).items()))[1]  # noqa: E731: the first encoder's tokens
    prompt, empty = chunk_ids(encoder(attention_prompt)), chunk_ids(encoder(""))[0]
    layers = chosen_layers(attention_maps, "")
    return [cross_attention_heat(layers, word_positions(prompt, content_ids(chunk_ids(encoder(word)), empty),
                                                        f"text {word!r} in attention_prompt"), size)
            for word in words]


def word_embeddings(clip, words: list[str]) -> list:
    if clip is None:
        raise ValueError("text with clip_vision: connect the clip too (it embeds the words)")
    return [clip.encode_from_tokens(clip.tokenize(word), return_pooled=True)[1] for word in words]


def crop_embeddings(clip_vision, picture, segments):
    if len(segments) == 0:
        return torch.zeros(0, 1)
    return torch.cat([clip_vision.encode_image(crop[None])["image_embeds"] for crop in segment_crops(picture, segments)])


class FastSAMSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastSAMSegment",
            display_name="FastSAM Segment",
            category="style_attention/diffstyler",
            description="Segments each image with FastSAM and picks segments by prompt (DiffStyler's mask prompts). "
            "Outputs their union as a MASK of the image's size and a preview with every segment numbered.",
            inputs=[
                FastSAM.Input("fastsam", tooltip="A FastSAM model (FastSAM Loader)."),
                io.Image.Input("image", tooltip="The content image, as encoded (any size, any batch)."),
                io.Combo.Input("prompt", options=list(PROMPTS), default="everything",
                               tooltip="everything: the segments numbered in segment_indices (all if empty); boxes: "
                               "the segment overlapping each box best; points: FastSAM's point prompt; text: for each "
                               "word the segment its cross-attention covers best."),
                io.String.Input("segment_indices", default="",
                                tooltip="everything: segment numbers from the preview (largest first, from 0), e.g. "
                                "0, 3. Empty: all."),
                io.String.Input("boxes", default="", multiline=True,
                                tooltip="boxes: x1, y1, x2, y2 in pixels, one box per line."),
                io.String.Input("points", default="", multiline=True,
                                tooltip="points: x, y in pixels, one per line: segments holding them are added."),
                io.String.Input("negative_points", default="", multiline=True,
                                tooltip="points: x, y per line: segments holding them are removed."),
                io.String.Input("text", default="", tooltip="text: words, separated by commas; each picks a segment."),
                io.Int.Input("imgsz", default=DEFAULTS["imgsz"], min=32, max=4096, step=32,
                             tooltip="FastSAM's inference size (longest side; FastSAM: 1024)."),
                io.Float.Input("conf", default=DEFAULTS["conf"], min=0.0, max=1.0, step=0.01,
                               tooltip="Segments below this confidence are dropped (FastSAM: 0.4)."),
                io.Float.Input("iou", default=DEFAULTS["iou"], min=0.0, max=1.0, step=0.01,
                               tooltip="Overlap above which duplicate segments are merged (FastSAM: 0.9)."),
                AttentionMaps.Input("attention_maps", optional=True,
                                    tooltip="text: cross-attention maps captured over this image (e.g. during its "
                                    "DDIM inversion with attention_prompt)."),
                io.Clip.Input("clip", optional=True, tooltip="text: tokenizes attention_prompt and the words."),
                io.String.Input("attention_prompt", default="", optional=True,
                                tooltip="text: the prompt the attention maps were captured with; the words are in it."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="text, instead of attention maps: a CLIP image model scores each segment's "
                                    "crop against each word's pooled clip embedding (same CLIP space, e.g. SDXL's clip "
                                    "with clip_vision_g)."),
            ],
            outputs=[io.Mask.Output(display_name="mask"), io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(cls, fastsam, image, prompt, segment_indices, boxes, points, negative_points, text, imgsz, conf, iou,
                attention_maps=None, clip=None, attention_prompt="", clip_vision=None) -> io.NodeOutput:
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, not {prompt!r}")
        select = selector(prompt, segment_indices, boxes, points, negative_points, text)
        heats = texts = None
        if prompt == "text" and clip_vision is not None:
            texts = word_embeddings(clip, select)
        elif prompt == "text":
            heats = word_heats(attention_maps, clip, attention_prompt, select, tuple(image.shape[1:3]))
            if any(heat.shape[0] not in (1, image.shape[0]) for heat in heats):
                raise ValueError(f"attention_maps: captured {heats[0].shape[0]} images for {image.shape[0]} here")
        device = comfy.model_management.get_torch_device()
        masks, previews = [], []
        try:
            for index, picture in enumerate(image):
                comfy.model_management.throw_exception_if_processing_interrupted()
                pixels = (picture.clamp(0, 1) * 255).round().byte().cpu().numpy()
                segments = largest_first(fastsam.segment(pixels, device, imgsz, conf, iou))
                if texts is not None:
                    picked = by_similarity(segments, crop_embeddings(clip_vision, picture.cpu().float(), segments), texts)
                elif heats is not None:
                    picked = by_attention(segments, [heat[min(index, heat.shape[0] - 1)] for heat in heats])
                else:
                    picked = select(segments)
                if not picked.any():
                    raise ValueError(f"prompt {prompt!r} picked no pixel of image {index}: see the preview")
                masks.append(picked.float())
                previews.append(preview(picture.cpu().float(), segments, picked))
        finally:
            fastsam.offload()
        return io.NodeOutput(torch.stack(masks), torch.stack(previews))


def selector(prompt, segment_indices, boxes, points, negative_points, text):
    if prompt == "everything":
        indices = [int(v) for (v,) in numbers(segment_indices.replace(",", "\n"), 1, "segment_indices")]
        return lambda segments: by_indices(segments, indices)
    if prompt == "boxes":
        chosen = numbers(boxes, 4, "boxes")
        if not chosen:
            raise ValueError("boxes: prompt is boxes but no box is given (x1, y1, x2, y2 per line)")
        return lambda segments: by_boxes(segments, chosen)
    if prompt == "points":
        positive, negative = numbers(points, 2, "points"), numbers(negative_points, 2, "negative_points")
        labels = [True] * len(positive) + [False] * len(negative)
        return lambda segments: by_points(segments, positive + negative, labels)
    words = [word.strip() for word in text.split(",") if word.strip()]
    if not words:
        raise ValueError("text: prompt is text but no word is given")
    return words


register_model_folders()
