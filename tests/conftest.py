"""A real ComfyUI in the test process: its node loader, model patcher, samplers and execution engine.

ComfyUI comes from COMFYUI_DIR (make setup provisions .comfyui/ComfyUI). The pack is loaded through
ComfyUI's own custom-node loader, exactly as a user's ComfyUI loads it.
"""

import asyncio
import importlib
import json
import logging
import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import comfyui_host  # noqa: E402

comfyui_host.prepare(cpu=True)
REPO, COMFYUI_DIR = comfyui_host.REPO, comfyui_host.COMFYUI_DIR

import torch  # noqa: E402

import comfyui_version  # noqa: E402
import execution  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
import random_dits  # noqa: E402
import random_models  # noqa: E402
from support.dit_workflow_models import tiny_qwen_image_models, tiny_sd35_models, tiny_z_image_models  # noqa: E402
from ui_workflow import schema_inputs, ui_to_api  # noqa: E402

COMFYUI_VERSION = comfyui_version.__version__
# scripts/hosts.py runs the suite once per ComfyUI host; the end-to-end tests (a real server, the
# browser) run on one of them only.
END_TO_END_HOST = os.environ.get("STYLE_ATTENTION_END_TO_END_HOST")


def pytest_collection_modifyitems(config, items):
    if END_TO_END_HOST is None or END_TO_END_HOST == os.environ.get("STYLE_ATTENTION_HOST"):
        return
    skips = {"end_to_end": pytest.mark.skip(reason=f"end-to-end (server, browser): make test runs these on ComfyUI "
                                                   f"{END_TO_END_HOST}"),
             "one_host": pytest.mark.skip(reason=f"the same on every host (pure torch, the repository's files) or a "
                                                 f"precision matrix: make test runs these on ComfyUI {END_TO_END_HOST}")}
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker):
                item.add_marker(skip)


PACK_NODE_IDS = ("VisualStylePrompting", "StyleAlignedAttention", "StyleReferenceLatent", "ReferenceTargetPrompts",
                 "DDIMInversion", "SaveInversion", "LoadInversion", "StyleReferenceInversion", "CaptureAttentionMaps",
                 "AttentionMapHeatmap")


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _load_comfyui_nodes() -> tuple[list[str], frozenset, list[str]]:
    """Load ComfyUI's own nodes, then custom_nodes/ through its loader.

    Returns the built-in node files that failed to import, the core node ids, and the custom-node loader's log.
    """
    asyncio.run(nodes.init_public_apis())
    builtin_failures = asyncio.run(nodes.init_builtin_extra_nodes())
    core_ids = frozenset(nodes.NODE_CLASS_MAPPINGS)
    capture = _LogCapture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.INFO)
    try:
        asyncio.run(nodes.init_external_custom_nodes())
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
    return builtin_failures, core_ids, capture.lines


BUILTIN_IMPORT_FAILURES, CORE_NODE_IDS, CUSTOM_NODE_LOADER_LOG = _load_comfyui_nodes()


PACK = comfyui_host.pack_module()


def pack_submodule(name: str):
    """A module of the pack as ComfyUI loaded it (imported now if no node needed it yet)."""
    return importlib.import_module(f"{PACK.__name__}.{name}")


@pytest.fixture(scope="session")
def pack():
    return PACK


@pytest.fixture(scope="session")
def sd15():
    return random_models.tiny_sd15(seed=0)


@pytest.fixture(scope="session")
def sdxl():
    return random_models.tiny_sdxl(seed=0)


@pytest.fixture(params=["sd15", "sdxl"])
def models(request):
    return request.getfixturevalue(request.param)


class HeadlessServer:
    """Where PromptExecutor reports progress when no web server runs: it keeps the messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@pytest.fixture(scope="session")
def flux_models():
    return random_dits.tiny_flux_models(seed=0)


@pytest.fixture(scope="session")
def sd35_models():
    return tiny_sd35_models(seed=0)


@pytest.fixture(scope="session")
def qwen_image_models():
    return tiny_qwen_image_models(seed=0)


@pytest.fixture(scope="session")
def z_image_models():
    return tiny_z_image_models(seed=0)


class RandomWeightCheckpoint:
    """Test stand-in for CheckpointLoaderSimple: the tiny random models of this session."""

    MODELS: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"architecture": (["sd15", "sdxl", "flux", "sd35", "qwen_image", "z_image"],)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, architecture):
        models = self.MODELS[architecture]
        return models.model, models.clip, models.vae


class RandomWeightPart(RandomWeightCheckpoint):
    """Test stand-in for the loader of one file of a model (Load Diffusion Model, DualCLIPLoader, Load CLIP,
    Load VAE)."""

    def load(self, architecture):
        return (getattr(self.MODELS[architecture], self.PART),)


nodes.NODE_CLASS_MAPPINGS["RandomWeightCheckpoint"] = RandomWeightCheckpoint
for _loader, _part, _type in (("UNETLoader", "model", "MODEL"), ("DualCLIPLoader", "clip", "CLIP"),
                              ("CLIPLoader", "clip", "CLIP"), ("VAELoader", "vae", "VAE")):
    nodes.NODE_CLASS_MAPPINGS[f"RandomWeight{_loader}"] = type(f"RandomWeight{_loader}", (RandomWeightPart,),
                                                               {"PART": _part, "RETURN_TYPES": (_type,)})


def node_inputs(class_type: str):
    return schema_inputs(nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES())


def load_workflow_as_api(path: Path) -> dict:
    return ui_to_api(json.loads(path.read_text()), node_inputs)


class Engine:
    """Runs API-format prompts through ComfyUI's validation and PromptExecutor."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.executor = execution.PromptExecutor(HeadlessServer(), cache_args={"lru": 0, "ram": 0})

    def run(self, prompt: dict) -> dict:
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt did not validate: {valid[1]} {valid[3]}")
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        if not self.executor.success:
            errors = [data for event, data in self.executor.status_messages if event == "execution_error"]
            raise ExecutionFailed(errors[0]["exception_message"] if errors else "execution failed", errors)
        return self.executor.history_result["outputs"]

    def images(self, outputs: dict) -> list[Path]:
        return [
            Path(folder_paths.get_output_directory()) / image["subfolder"] / image["filename"]
            for node_output in outputs.values()
            for image in node_output.get("images", [])
            if image.get("type", "output") == "output"  # previews (a fit's loss curve) go to the temp folder
        ]


class ExecutionFailed(AssertionError):
    def __init__(self, message, errors):
        super().__init__(message)
        self.message = message
        self.errors = errors


@pytest.fixture
def loras_folder(tmp_path, monkeypatch):
    """models/loras/ for this test: a fitted LoRA is written there and LoraLoader lists it."""
    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(folder)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


@pytest.fixture(scope="session")
def random_fastsam(tmp_path_factory):
    """models/fastsam/FastSAM-s.pt with random weights (the smallest YOLOv8-seg scale, for speed)."""
    folder = tmp_path_factory.mktemp("fastsam")
    pack_submodule("mask.fastsam").random_fastsam_checkpoint(str(folder / "FastSAM-s.pt"), scale="n")
    return folder


@pytest.fixture
def fastsam_models(random_fastsam, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "fastsam", ([str(random_fastsam)], {".pt"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return random_fastsam


@pytest.fixture
def engine(tmp_path, sd15, sdxl, flux_models, sd35_models, qwen_image_models, z_image_models, loras_folder,
           fastsam_models):
    RandomWeightCheckpoint.MODELS = {"sd15": sd15, "sdxl": sdxl, "flux": flux_models, "sd35": sd35_models,
                                     "qwen_image": qwen_image_models, "z_image": z_image_models}
    folder_paths.set_output_directory(str(tmp_path))
    return Engine(tmp_path)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
