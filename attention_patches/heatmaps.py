"""Drawing captured attention maps over images: cross-attention per prompt token, self-attention
from a query point (one panel per block of keys: the image itself, the style reference)."""

import torch
import torch.nn.functional as F

from .attention_maps import AttentionMapError, LayerMaps


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
    """The first of maps, all captured alike (the same images, the same blocks of keys), or an error that
    names the groups of layers captured alike."""
    groups: dict[tuple, list[str]] = {}
    for layer in maps:
        groups.setdefault((layer.first_image, layer.key_sources, layer.total.shape[0]), []).append(layer.name)
    if len(groups) > 1:
        described = "; ".join(f"{', '.join(names)} (keys: {', '.join(sources)}"
                              f"{', an in-batch reference' if first_image else ''})"
                              for (first_image, sources, _), names in groups.items())
        raise AttentionMapError(
            f"layers: the chosen layers were captured differently (styled by another method or reference, or not "
            f"styled): {described}; choose layers captured alike, e.g. {', '.join(list(groups.values())[-1])}"
        )
    return maps[0]


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
    heats = self_attention_heat(maps, x, y, size)
    panels = [mark_point(targets, x, y)]
    for source, heat in zip(maps[0].key_sources, heats):
        if source == "self":
            background = targets
        else:  # "reference", or "reference N" of a set of several (Combine Style References)
            number = int(source.removeprefix("reference").strip() or 1)
            background = reference_background(maps, images, reference_image, size, number - 1)
        panels.append(overlay(background, heat, opacity))
    return torch.cat(panels, dim=2)


def reference_background(maps: list[LayerMaps], images: torch.Tensor, reference_image: torch.Tensor | None,
                         size: tuple[int, int], index: int = 0) -> torch.Tensor:
    """The reference under its keys' panel: batch item 0 for an in-batch reference, else item index of
    reference_image (a set's references in its order) resized to the images' size, else black."""
    count = maps[0].total.shape[0]
    if maps[0].first_image == 1:
        reference = images[:1]
    elif reference_image is not None and index < reference_image.shape[0]:
        reference = reference_image[index:index + 1]
    else:
        return torch.zeros(count, *size, 3)
    reference = resized(reference.float().movedim(-1, 1).flatten(0, 1), size).reshape(1, 3, *size).movedim(1, -1)
    return reference.expand(count, -1, -1, -1)
