"""Every shipped UI workflow converts with the running ComfyUI's node schemas and executes in its engine."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

import folder_paths
from PIL import Image

from conftest import REPO, Engine, load_workflow_as_api, pack_submodule
from support.joint_blocks import lumina_reachable

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
STYLE_NODES = {"VisualStylePrompting", "StyleAlignedAttention", "FitStyleLoRA", "StyleInjection", "MaskedStyleBlend"}
TEST_SIDE = 64  # LoadImage's images are scaled (center crop) to this side
# A model's separate files (a Flux, Qwen-Image or Z-Image setup) load from conftest's stand-ins for these loaders.
PART_LOADERS = ("UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader")
# The tiny random models a workflow runs on, by a name in its file name (sd15 otherwise).
ARCHITECTURES = ("sdxl", "flux", "sd35", "qwen_image", "z_image")
# In-batch workflows on DiTs: (architecture, KSampler's cfg, sampler and scheduler as the family is run).
DIT_IN_BATCH_WORKFLOWS = {
    "flux_visual_style_prompting_in_batch": ("flux", (1.0, "euler", "simple")),
    "sd35_visual_style_prompting_in_batch": ("sd35", (4.5, "euler", "sgm_uniform")),
    "qwen_image_style_aligned_prompts": ("qwen_image", (2.5, "euler", "simple")),
    "z_image_visual_style_prompting_in_batch": ("z_image", (1.0, "res_multistep", "simple")),
}
# The style nodes reach a Lumina 2 / Z-Image layer only where ComfyUI gives its attention calls a block index.
NO_LUMINA = pytest.mark.skip(reason="this ComfyUI's Lumina 2 (Z-Image) gives its attention calls no block index: the "
                                    "style nodes refuse the model (ComfyUI 0.8.0 runs this workflow)")


def for_this_host(workflows) -> list:
    """The workflows as test parameters named by their stem, a Z-Image one skipped where its layers are out of reach."""
    return [pytest.param(workflow, id=Path(workflow).stem,
                         marks=[NO_LUMINA] if "z_image" in Path(workflow).stem and not lumina_reachable() else [])
            for workflow in workflows]


def test_every_workflow_has_a_thumbnail():
    assert WORKFLOWS
    for workflow in WORKFLOWS:
        assert workflow.with_suffix(".jpg").is_file(), workflow.name


def for_test_models(prompt: dict, architecture: str) -> dict:
    """Swap the checkpoint (or a model's separate files) for the tiny random models and shrink images and steps;
    nothing else changes."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():  # prompts in the image's pixels follow the image to its test size
        if node["class_type"] == "FastSAMSegment":
            source = prompt[node["inputs"]["image"][0]]
            assert source["class_type"] == "LoadImage", "a FastSAM image straight from Load Image"
            width, height = Image.open(folder_paths.get_annotated_filepath(source["inputs"]["image"])).size
            for name in ("boxes", "points", "negative_points"):
                node["inputs"][name] = at_test_size(node["inputs"][name], width, height)
            node["inputs"].update(imgsz=160, conf=0.01)
    for node_id in [node_id for node_id, node in prompt.items() if node["class_type"] == "LoadImage"]:
        scaled_id = f"{node_id}_scaled"
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if value == [node_id, 0]:
                    node["inputs"][name] = [scaled_id, 0]
        prompt[scaled_id] = {"class_type": "ImageScale", "inputs": {
            "image": [node_id, 0], "upscale_method": "area", "width": TEST_SIDE, "height": TEST_SIDE, "crop": "center"}}
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "RandomWeightCheckpoint", {"architecture": architecture}
        elif node["class_type"] in PART_LOADERS:
            node["inputs"] = {"architecture": architecture}
            node["class_type"] = f"RandomWeight{node['class_type']}"
        elif node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage", "ImageScale"):
            # ImageScale: a reference scaled to the output's size
            node["inputs"].update(width=TEST_SIDE, height=TEST_SIDE)
        elif node["class_type"] in ("KSampler", "KSamplerAdvanced", "DDIMInversion", "RecordContentFeatures"):
            node["inputs"]["steps"] = 3
        elif node["class_type"] == "FitStyleLoRA":  # a few steps on the 64x64 image, large enough to show
            node["inputs"].update(steps=3, resolution=0, learning_rate=1e-2)
        elif node["class_type"] == "PromptEmbeddingInversion":
            node["inputs"].update(steps=3, inner_iterations=2)
    return prompt


def at_test_size(coordinates: str, width: int, height: int) -> str:
    """Pixel coordinates (x, y, ... per line) after ImageScale's centre crop to a square and resize."""
    side = min(width, height)
    offsets, scale = ((width - side) / 2, (height - side) / 2), TEST_SIDE / side
    lines = [[float(v) for v in line.replace(",", " ").split()] for line in coordinates.splitlines() if line.strip()]
    return "\n".join(", ".join(f"{(v - offsets[i % 2]) * scale:.1f}" for i, v in enumerate(line)) for line in lines)


def without_style(prompt: dict) -> dict:
    """The same graph with every style node bypassed: its consumers take the model it was given."""
    prompt = copy.deepcopy(prompt)
    bypassed = {node_id: node["inputs"]["model"] for node_id, node in prompt.items() if node["class_type"] in STYLE_NODES}
    for node_id in bypassed:
        del prompt[node_id]
    for node in prompt.values():
        for name, value in node["inputs"].items():
            while isinstance(value, list) and value[0] in bypassed:  # a style node fed by another one
                value = node["inputs"][name] = bypassed[value[0]]
    references = ("StyleReferenceLatent", "StyleReferenceInversion", "CombineStyleReferences")
    for node in prompt.values():  # an edit without control: the target prompt sampled from the inverted latent
        if node["class_type"] == "PromptToPromptEdit":
            node["inputs"].update(tau_v=0.0, tau_c=0.0, tau_s=0.0, tau_u=0.0, blend_source_words="",
                                  blend_target_words="")
    return {node_id: node for node_id, node in prompt.items() if node["class_type"] not in references}


def without_heatmaps(prompt: dict) -> dict:
    """The graph without its attention-map drawing (and what saves it): what remains are the samples."""
    drawn = {node_id for node_id, node in prompt.items() if node["class_type"] == "AttentionMapHeatmap"}
    consumers = {node_id for node_id, node in prompt.items()
                 if any(isinstance(value, list) and value[0] in drawn for value in node["inputs"].values())}
    return {node_id: node for node_id, node in prompt.items() if node_id not in drawn | consumers}


def with_style_inputs(prompt: dict, **inputs) -> dict:
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] in STYLE_NODES:
            node["inputs"].update({name: value for name, value in inputs.items() if name in node["inputs"]})
    return prompt


def pixels(engine, outputs):
    images = engine.images(outputs)
    assert images, "the workflow saved no image"
    return np.stack([np.asarray(Image.open(path)) for path in images])


@pytest.mark.parametrize("workflow", for_this_host(WORKFLOWS))
def test_workflow_executes_styles_and_leaves_the_model_clean(engine, workflow):
    architecture = next((name for name in ARCHITECTURES if name in workflow.stem), "sd15")
    prompt = without_heatmaps(for_test_models(load_workflow_as_api(workflow), architecture))
    unstyled_prompt = without_style(prompt)

    unstyled = pixels(engine, Engine(engine.output_dir).run(unstyled_prompt))
    styled = pixels(engine, engine.run(prompt))
    assert styled.shape == unstyled.shape
    assert not np.array_equal(styled, unstyled)
    if any("strength" in node["inputs"] for node in prompt.values() if node["class_type"] in STYLE_NODES):
        assert np.array_equal(pixels(engine, engine.run(with_style_inputs(prompt, strength=0.0))), unstyled)
    if any("start_percent" in node["inputs"] for node in prompt.values() if node["class_type"] in STYLE_NODES):
        assert np.array_equal(
            pixels(engine, engine.run(with_style_inputs(prompt, start_percent=0.5, end_percent=0.5))), unstyled)
    assert np.array_equal(pixels(engine, Engine(engine.output_dir).run(unstyled_prompt)), unstyled)


def test_the_attention_map_workflow_draws_where_the_targets_look_in_the_reference(engine):
    prompt = for_test_models(load_workflow_as_api(REPO / "example_workflows" / "visual_style_prompting_attention_maps.json"),
                             "sd15")
    (heatmap_id,) = [node_id for node_id, node in prompt.items() if node["class_type"] == "AttentionMapHeatmap"]
    (save_id,) = [node_id for node_id, node in prompt.items() if node["inputs"].get("images") == [heatmap_id, 0]]
    outputs = engine.run(prompt)
    samples = pixels(engine, {node_id: out for node_id, out in outputs.items() if node_id != save_id})
    drawn = pixels(engine, {save_id: outputs[save_id]})
    batch, height, width = samples.shape[:3]
    assert drawn.shape[:3] == (batch - 1, height, 2 * width), "per target: [marked image | heat over the reference]"


def test_workflows_are_ui_format():
    for workflow in WORKFLOWS:
        data = json.loads(workflow.read_text())
        assert {"nodes", "links", "version"} <= set(data), workflow.name
        assert all("widgets_values" in node and "pos" in node for node in data["nodes"]), workflow.name


def test_the_edit_workflow_reconstructs_the_image_with_its_own_prompt(engine):
    prompt = for_test_models(load_workflow_as_api(REPO / "example_workflows" / "stylediffusion_edit_real_image.json"),
                             "sd15")
    (edit_id,) = [node_id for node_id, node in prompt.items() if node["class_type"] == "PromptToPromptEdit"]
    (inversion_id,) = [node_id for node_id, node in prompt.items() if node["class_type"] == "PromptEmbeddingInversion"]
    prompt[edit_id]["inputs"].update(target_prompt=prompt[inversion_id]["inputs"]["source_prompt"], tau_v=1.0,
                                     blend_source_words="", blend_target_words="")
    edited, reconstruction = pixels(engine, engine.run(prompt))  # the two SaveImage nodes, edit first
    assert np.abs(edited.astype(int) - reconstruction.astype(int)).max() <= 1


@pytest.mark.parametrize("workflow", for_this_host(DIT_IN_BATCH_WORKFLOWS))
def test_a_dit_workflow_styles_the_targets_from_batch_item_0(engine, workflow):
    """On the tiny random Flux, SD3.5 Large, Qwen-Image or Z-Image (its checkpoint or its diffusion model, text
    encoder and VAE loaded by the loaders' stand-ins, the text encoders ComfyUI's own classes): the reference
    (item 0) is sampled as without the style, each target changes."""
    architecture, sampler_settings = DIT_IN_BATCH_WORKFLOWS[workflow]
    prompt = for_test_models(load_workflow_as_api(REPO / "example_workflows" / f"{workflow}.json"), architecture)
    assert not {node["class_type"] for node in prompt.values()} & {*PART_LOADERS, "CheckpointLoaderSimple"}
    (sampler,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "KSampler"]
    assert (sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == sampler_settings
    (prompts,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "ReferenceTargetPrompts"]
    batch = 1 + len([line for line in prompts["target_prompts"].splitlines() if line.strip()])
    styled = pixels(engine, engine.run(prompt))
    unstyled = pixels(engine, Engine(engine.output_dir).run(without_style(prompt)))
    assert styled.shape == (batch, TEST_SIDE, TEST_SIDE, 3)
    assert np.abs(styled[0].astype(int) - unstyled[0].astype(int)).max() <= 1
    assert all(not np.array_equal(styled[i], unstyled[i]) for i in range(1, len(styled)))


@pytest.mark.parametrize("workflow", [name for name, (architecture, _) in DIT_IN_BATCH_WORKFLOWS.items()
                                      if architecture in ("qwen_image", "z_image")])
def test_the_prompts_of_a_text_encoder_without_padding_have_one_token_count(request, workflow):
    """Qwen-Image's and Z-Image's text encoders give a prompt its own token count: Reference + Target Prompts would
    repeat prompts of different counts to a common length, which a joint attention reads as a longer caption."""
    architecture = DIT_IN_BATCH_WORKFLOWS[workflow][0]
    clip = request.getfixturevalue(f"{architecture}_models").clip  # ComfyUI's tokenizer of the family
    prompt = load_workflow_as_api(REPO / "example_workflows" / f"{workflow}.json")
    (prompts,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "ReferenceTargetPrompts"]
    compose = pack_submodule("nodes.batch_prompts").compose_prompt
    lines = [prompts["reference_prompt"], *[line for line in prompts["target_prompts"].splitlines() if line.strip()]]
    counts = {line: sum(len(chunk) for chunks in clip.tokenize(compose(line, prompts["style_description"])).values()
                        for chunk in chunks) for line in lines}
    assert len(set(counts.values())) == 1, counts
