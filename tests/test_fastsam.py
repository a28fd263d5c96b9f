"""FastSAM Loader / Segment: a random-weight FastSAM-architecture checkpoint through the real
ultralytics loader, offline; segment selection by box, point, index and a word's cross-attention."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import folder_paths
import random_models
import nodes
from conftest import REPO, pack_submodule
from helpers import encode, invert, run_node

segments_module = pack_submodule("mask.segments")
fastsam_module = pack_submodule("mask.fastsam")
tokens_module = pack_submodule("attention_patches.prompt_tokens")


def shapes(height=60, width=80):
    """Known segments: a background, a 'house' box, a 'door' inside it, a 'tree' disc, largest first."""
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    background = rows >= 40
    house = (rows >= 10) & (rows < 40) & (columns >= 10) & (columns < 40)
    door = (rows >= 25) & (rows < 40) & (columns >= 20) & (columns < 28)
    tree = (rows - 20) ** 2 + (columns - 62) ** 2 < 100
    return torch.stack([tree, background, door, house])  # deliberately not ordered


def test_boxes_pick_the_segment_they_overlap_most():
    segments = shapes()
    house, door, tree = segments[3], segments[2], segments[0]
    assert torch.equal(segments_module.by_boxes(segments, [(10, 10, 40, 40)]), house)
    assert torch.equal(segments_module.by_boxes(segments, [(19, 24, 29, 40)]), door)
    assert torch.equal(segments_module.by_boxes(segments, [(10, 10, 40, 40), (52, 10, 72, 30)]), house | tree)
    with pytest.raises(ValueError, match=r"boxes: \(100, 100, 120, 120\) has no area inside the 80x60 image"):
        segments_module.by_boxes(segments, [(100, 100, 120, 120)])


def test_points_add_the_segments_holding_them_and_negative_points_take_theirs_away():
    segments = shapes()
    house, door, tree = segments[3], segments[2], segments[0]
    assert torch.equal(segments_module.by_points(segments, [(15, 15)], [True]), house)
    assert torch.equal(segments_module.by_points(segments, [(24, 30)], [True]), house)  # the door is in the house
    assert torch.equal(segments_module.by_points(segments, [(24, 30), (15, 15)], [False, True]), house & ~door)
    without_door = segments_module.by_points(segments, [(15, 15), (24, 30)], [True, False])
    assert torch.equal(without_door, house & ~door)
    assert torch.equal(segments_module.by_points(segments, [(62, 20), (15, 15)], [True, True]), tree | house)
    with pytest.raises(ValueError, match=r"points: \(90, 5\) is outside the 80x60 image"):
        segments_module.by_points(segments, [(90, 5)], [True])
    with pytest.raises(ValueError, match="at least one positive point"):
        segments_module.by_points(segments, [(15, 15)], [False])


def test_indices_count_from_the_largest_segment():
    segments = shapes()
    ordered = segments_module.largest_first(segments)
    areas = ordered.flatten(1).sum(1)
    assert torch.all(areas[:-1] >= areas[1:])
    assert torch.equal(segments_module.by_indices(segments, [1]), ordered[1])
    assert torch.equal(segments_module.by_indices(segments, []), segments.any(0))
    with pytest.raises(ValueError, match=r"segment_indices: \[7\] not among the 4 segments"):
        segments_module.by_indices(segments, [7])
    with pytest.raises(ValueError, match="FastSAM found no segment"):
        segments_module.by_indices(torch.zeros(0, 60, 80, dtype=torch.bool), [])


def test_a_words_attention_picks_the_segment_it_covers_not_a_tiny_or_the_whole_one():
    segments = shapes()
    house, door = segments[3], segments[2]
    everything = torch.ones(1, 60, 80, dtype=torch.bool)
    peak = torch.zeros(1, 60, 80, dtype=torch.bool)
    peak[0, 30, 24] = True
    candidates = torch.cat([segments, everything, peak])
    heat = house.float() * 0.8 + 0.05 * torch.rand(60, 80, generator=torch.Generator().manual_seed(0))
    heat[30, 24] = 1.0  # the hottest pixel is a one-pixel segment of its own
    assert torch.equal(segments_module.by_attention(candidates, [heat]), house)
    door_heat = door.float() + 0.1 * house.float()
    assert torch.equal(segments_module.by_attention(candidates, [heat, door_heat]), house | door)


def test_words_are_found_among_the_prompts_tokens_on_the_models_tokenizers(sd15, sdxl):
    for models in (sd15, sdxl):
        for encoder, tokenized in models.clip.tokenize("a xylophonist painting of a fox").items():
            prompt = tokens_module.chunk_ids(tokenized)
            empty = tokens_module.chunk_ids(models.clip.tokenize("")[encoder])[0]
            fox = tokens_module.content_ids(tokens_module.chunk_ids(models.clip.tokenize("fox")[encoder]), empty)
            xylophonist = tokens_module.content_ids(
                tokens_module.chunk_ids(models.clip.tokenize("xylophonist")[encoder]), empty)
            assert len(fox) == 1 and len(xylophonist) >= 2, (encoder, xylophonist)  # a word of several tokens
            split = tokens_module.word_positions(prompt, xylophonist)
            assert split == list(range(2, 2 + len(xylophonist)))  # after the start token and "a"
            assert tokens_module.word_positions(prompt, fox) == [2 + len(xylophonist) + 3]
    long_prompt = ", ".join(["fox"] * 60)  # past one 77-token chunk: positions continue in the next
    prompt = tokens_module.chunk_ids(sd15.clip.tokenize(long_prompt)["l"])
    assert len(prompt) == 2 and max(tokens_module.word_positions(prompt, fox)) > 77


def test_a_missing_word_is_named():
    with pytest.raises(ValueError, match="text 'cat': its tokens"):
        tokens_module.word_positions([[1, 2, 3]], [9], "text 'cat'")


@pytest.fixture
def fastsam_folder(tmp_path, random_fastsam, fastsam_models, monkeypatch):
    """A models/fastsam/ of this test's own (it may add files), with the random FastSAM-s.pt."""
    folder = tmp_path / "fastsam"
    folder.mkdir()
    shutil.copyfile(random_fastsam / "FastSAM-s.pt", folder / "FastSAM-s.pt")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "fastsam", ([str(folder)], {".pt"}))
    return folder


def image(batch=2, height=100, width=150, seed=0):
    """Blocks of colour (a size FastSAM's stride does not divide)."""
    generator = torch.Generator().manual_seed(seed)
    picture = torch.rand(batch, 1, 1, 3, generator=generator).expand(batch, height, width, 3).clone()
    picture[:, 20:70, 30:90] = torch.tensor([0.9, 0.2, 0.1])
    return picture


def segment(fastsam, picture, prompt="everything", **settings):
    inputs = {"segment_indices": "", "boxes": "", "points": "", "negative_points": "", "text": "", "imgsz": 160,
              "conf": 0.01, "iou": 0.9, **settings}
    return run_node("FastSAMSegment", fastsam=fastsam, image=picture, prompt=prompt, **inputs)


def test_a_random_fastsam_loads_through_the_node_and_segments_any_size_and_batch(fastsam_folder):
    listed = nodes.NODE_CLASS_MAPPINGS["FastSAMLoader"].INPUT_TYPES()
    assert "FastSAM-s.pt" in listed["required"]["model_name"][1]["options"]
    (fastsam,) = run_node("FastSAMLoader", model_name="FastSAM-s.pt")
    picture = image()
    mask, shown = segment(fastsam, picture)
    assert mask.shape == (2, 100, 150) and shown.shape == (2, 100, 150, 3)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0} and mask.any()
    segments = segments_module.largest_first(fastsam.segment((picture[0] * 255).round().byte().numpy(),
                                                             torch.device("cpu"), 160, 0.01, 0.9))
    assert len(segments) > 1 and segments.shape[-2:] == (100, 150)
    boxed, _ = segment(fastsam, picture[:1], "boxes", boxes="30, 20, 90, 70")
    assert torch.equal(boxed[0].bool(), segments_module.by_boxes(segments, [(30, 20, 90, 70)]))
    pointed, _ = segment(fastsam, picture[:1], "points", points="60, 45")
    assert torch.equal(pointed[0].bool(), segments_module.by_points(segments, [(60, 45)], [True]))
    numbered, _ = segment(fastsam, picture[:1], segment_indices="1")
    assert torch.equal(numbered[0].bool(), segments[1])


def test_bad_files_and_inputs_are_named(fastsam_folder, tmp_path):
    (fastsam_folder / "broken.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, fastsam_folder / "foreign.pt")
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes((fastsam_folder / "FastSAM-s.pt").read_bytes())
    (fastsam_folder / "link.pt").symlink_to(outside)
    folder_paths.filename_list_cache.clear()
    with pytest.raises(ValueError, match="model_name: broken.pt is not a FastSAM checkpoint"):
        run_node("FastSAMLoader", model_name="broken.pt")
    with pytest.raises(ValueError, match="model_name: foreign.pt is not a FastSAM checkpoint"):
        run_node("FastSAMLoader", model_name="foreign.pt")
    with pytest.raises(ValueError, match="model_name: link.pt is not a regular file inside .* link out"):
        run_node("FastSAMLoader", model_name="link.pt")
    with pytest.raises(ValueError, match=r"model_name: '../elsewhere.pt' is not a FastSAM model in"):
        run_node("FastSAMLoader", model_name="../elsewhere.pt")
    (fastsam,) = run_node("FastSAMLoader", model_name="FastSAM-s.pt")
    with pytest.raises(ValueError, match=r"boxes: '1, 2, 3' is not 4 numbers"):
        segment(fastsam, image(1), "boxes", boxes="1, 2, 3")
    with pytest.raises(ValueError, match="boxes: prompt is boxes but no box"):
        segment(fastsam, image(1), "boxes")
    with pytest.raises(ValueError, match="text: connect attention_maps"):
        segment(fastsam, image(1), "text", text="house")


def test_with_no_model_the_loader_says_which_file_to_put_where(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "fastsam", ([str(empty)], {".pt"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    loader = nodes.NODE_CLASS_MAPPINGS["FastSAMLoader"]
    options = loader.INPUT_TYPES()["required"]["model_name"][1]["options"]
    assert options == ["(none found: put FastSAM-s.pt or FastSAM-x.pt in models/fastsam)"]
    with pytest.raises(ValueError, match="put FastSAM-s.pt or FastSAM-x.pt .* there"):
        run_node("FastSAMLoader", model_name=options[0])


def test_the_text_prompt_picks_the_segment_the_words_cross_attention_covers(fastsam_folder, sd15):
    (fastsam,) = run_node("FastSAMLoader", model_name="FastSAM-s.pt")
    picture = image(1, 64, 64)
    prompt = "a red house on a hill"
    (captured, maps) = run_node("CaptureAttentionMaps", model=sd15.model, attention="cross_attention",
                                layers="all_self_attention", custom_layers="", start_percent=0.0, end_percent=1.0, max_megabytes=64)
    invert(captured, sd15.vae.encode(picture), encode(sd15.clip, prompt), encode(sd15.clip, ""), steps=2)
    mask, _ = segment(fastsam, picture, "text", text="house", attention_maps=maps, clip=sd15.clip,
                      attention_prompt=prompt)
    # independently: the word is token 3 of the prompt (start, a, red, house); its heat as the heatmap draws it
    heat = pack_submodule("attention_patches.heatmaps").cross_attention_heat(list(maps.layers.values()), [3], (64, 64))
    segments = segments_module.largest_first(fastsam.segment((picture[0] * 255).round().byte().numpy(),
                                                             torch.device("cpu"), 160, 0.01, 0.9))
    scores = segments_module.attention_scores(segments, heat[0])
    assert torch.equal(mask[0].bool(), segments[int(scores.argmax())])
    with pytest.raises(ValueError, match="text 'tiger' in attention_prompt: its tokens"):
        segment(fastsam, picture, "text", text="tiger", attention_maps=maps, clip=sd15.clip, attention_prompt=prompt)


def test_a_clip_vision_model_can_score_the_segments_for_the_words_instead(fastsam_folder, sdxl, tmp_path):
    (fastsam,) = run_node("FastSAMLoader", model_name="FastSAM-s.pt")
    vision = random_models.tiny_clip_vision(tmp_path / "tiny_clip_vision.json")
    picture = image(1, 64, 64)
    mask, _ = segment(fastsam, picture, "text", text="house, tree", clip=sdxl.clip, clip_vision=vision)
    segments = segments_module.largest_first(fastsam.segment((picture[0] * 255).round().byte().numpy(),
                                                             torch.device("cpu"), 160, 0.01, 0.9))
    crops = segments_module.segment_crops(picture[0], segments)
    assert all(crop.shape[-1] == 3 and crop.shape[0] <= 64 for crop in crops)
    images = torch.nn.functional.normalize(torch.cat([vision.encode_image(c[None])["image_embeds"] for c in crops]), dim=-1)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    for word in ("house", "tree"):
        text = sdxl.clip.encode_from_tokens(sdxl.clip.tokenize(word), return_pooled=True)[1]
        expected |= segments[int(torch.argmax(images @ torch.nn.functional.normalize(text[0], dim=0)))]
    assert torch.equal(mask[0].bool(), expected)
    with pytest.raises(ValueError, match="clip_vision: its image embeddings have 32 channels and the clip's pooled "
                                         "text embedding 24"):
        segments_module.by_similarity(segments, images, [torch.zeros(1, 24)])
    with pytest.raises(ValueError, match="text with clip_vision: connect the clip too"):
        segment(fastsam, picture, "text", text="house", clip_vision=vision)


def test_nothing_is_fetched_from_the_network(tmp_path):
    """In a fresh process where every socket connection fails loudly: import, load, segment."""
    script = textwrap.dedent(f"""
        import importlib.util, socket, sys
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(args)
            raise OSError("network unreachable (test)")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        spec = importlib.util.spec_from_file_location("fastsam_alone", {str(REPO / "mask" / "fastsam.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.random_fastsam_checkpoint({str(tmp_path / "FastSAM-s.pt")!r}, scale="n")
        model = module.load_fastsam({str(tmp_path / "FastSAM-s.pt")!r}, "FastSAM-s.pt")
        import numpy, torch
        masks = model.segment(numpy.zeros((50, 70, 3), numpy.uint8) + 128, torch.device("cpu"), 96, 0.01, 0.9)
        print("segmented", tuple(masks.shape[1:]), "attempts", len(attempts))
    """)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    environment["YOLO_CONFIG_DIR"] = str(tmp_path / "ultralytics-settings")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "segmented (50, 70) attempts 0" in result.stdout, result.stdout + result.stderr[-2000:]
