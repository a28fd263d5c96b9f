"""Choosing segments (FastSAM's masks of one image) by prompt: boxes, points, indices, or a word's
attention map. Segments are (N, H, W) bool, ordered largest first (as FastSAM's own prompts order
them); every selection returns one (H, W) bool mask, the union of what it picked."""

import torch


class SelectionError(ValueError):
    pass


def largest_first(segments: torch.Tensor) -> torch.Tensor:
    areas = segments.flatten(1).sum(1)
    return segments[torch.argsort(areas, descending=True, stable=True)]


def _nonempty(segments: torch.Tensor, prompt: str) -> None:
    if segments.shape[0] == 0:
        raise SelectionError(f"FastSAM found no segment in this image, so no {prompt} can pick one: lower "
                             "confidence, or check the image")


def box_overlaps(segments: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """IoU of each segment with the box (x1, y1, x2, y2 in pixels, x2/y2 exclusive)."""
    height, width = segments.shape[-2:]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = max(0, min(x1, x2)), min(width, max(x1, x2))
    y1, y2 = max(0, min(y1, y2)), min(height, max(y1, y2))
    if x2 <= x1 or y2 <= y1:
        raise SelectionError(f"boxes: {box} has no area inside the {width}x{height} image")
    inside = segments[:, y1:y2, x1:x2].flatten(1).sum(1).float()
    areas = segments.flatten(1).sum(1).float()
    return inside / (areas + (x2 - x1) * (y2 - y1) - inside)


def by_boxes(segments: torch.Tensor, boxes: list[tuple[float, float, float, float]]) -> torch.Tensor:
    """For each box the segment that overlaps it best (IoU), as FastSAM's box prompt."""
    _nonempty(segments, "box")
    picked = torch.zeros(segments.shape[-2:], dtype=torch.bool)
    for box in boxes:
        overlaps = box_overlaps(segments, box)
        if float(overlaps.max()) <= 0:
            raise SelectionError(f"boxes: {box} overlaps no segment (see the preview)")
        picked |= segments[int(torch.argmax(overlaps))]
    return picked


def by_points(segments: torch.Tensor, points: list[tuple[float, float]], labels: list[bool]) -> torch.Tensor:
    """The segments holding a positive point, less the segments holding only negative points: a
    negative point on a door inside a picked house removes the door, not the house. (FastSAM's own
    loop, largest segment first, would clear the house too, as it also holds the negative point.)"""
    _nonempty(segments, "point")
    height, width = segments.shape[-2:]
    held = []
    for x, y in points:
        column, row = int(x), int(y)
        if not (0 <= column < width and 0 <= row < height):
            raise SelectionError(f"points: ({x}, {y}) is outside the {width}x{height} image")
        held.append(segments[:, row, column])
    if not any(labels):
        raise SelectionError("points: give at least one positive point (negative points only remove)")
    held = torch.stack(held, dim=1)  # (segments, points)
    labels = torch.tensor(labels, dtype=torch.bool)
    positive = held[:, labels].any(1)
    negative = held[:, ~labels].any(1) & ~positive
    picked = segments[positive].any(0) if positive.any() else torch.zeros((height, width), dtype=torch.bool)
    return picked & ~segments[negative].any(0) if negative.any() else picked


def by_indices(segments: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Segments by their number in the preview (largest first, from 0); no indices: all of them."""
    _nonempty(segments, "index")
    ordered = largest_first(segments)
    if not indices:
        return ordered.any(0)
    bad = [i for i in indices if not 0 <= i < len(ordered)]
    if bad:
        raise SelectionError(f"segment_indices: {bad} not among the {len(ordered)} segments (0 to {len(ordered) - 1})")
    return ordered[indices].any(0)


def attention_scores(segments: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """Soft IoU of each segment with a word's attention map (heat (H, W), scaled to [0, 1] by its
    maximum): sum(min) / sum(max). It favours the segment that covers where the word attends and little
    else, neither a tiny segment at the peak nor the whole image."""
    heat = heat.float().clamp(min=0)
    heat = heat / heat.max().clamp(min=1e-12)
    shapes = segments.float()
    union = torch.maximum(shapes, heat).flatten(1).sum(1).clamp(min=1e-12)
    return torch.minimum(shapes, heat).flatten(1).sum(1) / union


def by_attention(segments: torch.Tensor, heats: list[torch.Tensor]) -> torch.Tensor:
    """For each word's attention map (H, W) the segment that matches it best."""
    _nonempty(segments, "text")
    picked = torch.zeros(segments.shape[-2:], dtype=torch.bool)
    for heat in heats:
        picked |= segments[int(torch.argmax(attention_scores(segments, heat)))]
    return picked


def segment_crops(image: torch.Tensor, segments: torch.Tensor) -> list[torch.Tensor]:
    """Each segment's bounding box of the image (H, W, 3), black outside the segment: what a CLIP image
    model scores against a word (FastSAM's text prompt crops segments the same way)."""
    crops = []
    for segment in segments:
        rows, columns = torch.nonzero(segment, as_tuple=True)
        if not len(rows):  # an empty segment scores on one black pixel
            crops.append(torch.zeros_like(image[:1, :1]))
            continue
        top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(columns.min()), int(columns.max()) + 1
        crops.append((image * segment[..., None])[top:bottom, left:right])
    return crops


def by_similarity(segments: torch.Tensor, image_embeddings: torch.Tensor, text_embeddings: list[torch.Tensor]):
    """For each word's embedding the segment whose crop's embedding is closest (cosine)."""
    _nonempty(segments, "text")
    picked = torch.zeros(segments.shape[-2:], dtype=torch.bool)
    images = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    for text in text_embeddings:
        if text.shape[-1] != images.shape[-1]:
            raise SelectionError(
                f"clip_vision: its image embeddings have {images.shape[-1]} channels and the clip's pooled text "
                f"embedding {text.shape[-1]}: they must share CLIP's space (e.g. SDXL's clip with clip_vision_g; "
                "SD1.5's text encoder has no projection into it: use attention maps)")
        similarity = images @ torch.nn.functional.normalize(text.float().reshape(-1), dim=0)
        picked |= segments[int(torch.argmax(similarity))]
    return picked
