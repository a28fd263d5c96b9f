"""`make demo`: run example workflows headless through a real ComfyUI server.

By default three SD1.5 workflows (in-batch Visual Style Prompting, StyleAligned from prompts,
Visual Style Prompting from a DDIM-inverted reference image); `--all` (make demo ALL=1) runs every
SD1.5 workflow; `--quick` runs the first of the three at 128x128 and 3 steps (what `make test` runs:
the same path through the server in well under a minute). CKPT=/path/to/model.safetensors runs them on your SD1.5 checkpoint, exactly as
saved. Without it, a checkpoint with random weights (generated once) stands in; random weights draw
noise, not pictures, and the demo shrinks the images and steps to keep that quick.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_host import COMFYUI_DIR, REPO  # noqa: E402
from comfyui_server import request, running_server, terminate_on_sigterm  # noqa: E402
from ui_workflow import schema_inputs, ui_to_api  # noqa: E402

OUTPUT_DIR = REPO / "output"
RANDOM_CHECKPOINT = REPO / ".comfyui" / "RANDOM-WEIGHTS-NOT-A-MODEL-sd15.safetensors"
RANDOM_FASTSAM = "RANDOM-WEIGHTS-NOT-A-MODEL-FastSAM-s.pt"  # copied into models/fastsam when no FastSAM is there
# Every example workflow for SD1.5: the SDXL, Flux, SD3.5, Qwen-Image and Z-Image ones need their model files
# (run them from the frontend).
OTHER_MODELS = ("sdxl", "flux", "sd35", "qwen_image", "z_image")
ALL_WORKFLOWS = sorted(path.name for path in (REPO / "example_workflows").glob("*.json")
                       if not any(name in path.stem for name in OTHER_MODELS))
DEFAULT_WORKFLOWS = ["visual_style_prompting_in_batch.json", "style_aligned_prompts_sd15.json",
                     "visual_style_prompting_inversion.json"]
# With random weights: small images and few steps, since the pictures are noise anyway.
RANDOM_WEIGHTS_SIDE, RANDOM_WEIGHTS_STEPS = 256, 8
QUICK_SIDE, QUICK_STEPS = 128, 3  # --quick


def make_random_checkpoint() -> None:
    if RANDOM_CHECKPOINT.is_file():
        return
    print(f"generating a random-weight SD1.5-shaped checkpoint once: {RANDOM_CHECKPOINT}", flush=True)
    RANDOM_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    partial = RANDOM_CHECKPOINT.with_suffix(".partial")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import comfyui_host; comfyui_host.prepare(cpu=True)\n"
        "import random_models; random_models.save_demo_sd15_checkpoint(sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(REPO / "scripts"), str(partial)], check=True)
    partial.rename(RANDOM_CHECKPOINT)


def link_into_checkpoints(checkpoint: Path) -> str:
    folder = COMFYUI_DIR / "models" / "checkpoints"
    link = folder / checkpoint.name
    if link.is_symlink() and not link.exists():  # left by a checkpoint that moved
        link.unlink()
    if not link.exists():
        link.symlink_to(checkpoint.resolve())
    return checkpoint.name


def fastsam_model(name: str) -> str:
    """The workflow's FastSAM file if models/fastsam has it, else a random-weight one (copied there: the
    loader refuses links out of its folder)."""
    folder = COMFYUI_DIR / "models" / "fastsam"
    if (folder / name).is_file():
        return name
    if not (folder / RANDOM_FASTSAM).is_file():
        print(f"NOTE: no {name} in {folder}: a random-weight FastSAM stands in (its masks are boxes)", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        code = (
            "import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('fastsam', sys.argv[1])\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "module.random_fastsam_checkpoint(sys.argv[2], scale='n')\n"
        )
        subprocess.run([sys.executable, "-c", code, str(REPO / "mask" / "fastsam.py"), str(folder / RANDOM_FASTSAM)],
                       check=True)
    return RANDOM_FASTSAM


def resized_coordinates(coordinates: str, scale: tuple[float, float]) -> str:
    """x, y, ... per line, for an image resized by (x, y) scale."""
    lines = [[float(v) for v in line.replace(",", " ").split()] for line in coordinates.splitlines() if line.strip()]
    return "\n".join(", ".join(f"{v * scale[i % 2]:.1f}" for i, v in enumerate(line)) for line in lines)


def small_copy_of_input(name: str, side: int) -> str:
    from PIL import Image

    small_name = f"{Path(name).stem}-{side}px.png"
    small = COMFYUI_DIR / "input" / small_name
    if not small.is_file():
        Image.open(COMFYUI_DIR / "input" / name).convert("RGB").resize((side, side)).save(small)
    return small_name


def run_workflow(base: str, name: str, checkpoint_name: str, random_weights: bool, side: int = RANDOM_WEIGHTS_SIDE,
                 steps: int = RANDOM_WEIGHTS_STEPS) -> list[Path]:
    schemas = request(base, "/object_info")
    workflow = json.loads((REPO / "example_workflows" / name).read_text())
    prompt = ui_to_api(workflow, lambda class_type: schema_inputs(schemas[class_type]["input"]))
    if random_weights:  # FastSAM's pixel prompts follow their image to its small copy
        from PIL import Image

        for node in prompt.values():
            if node["class_type"] == "FastSAMSegment" and prompt[node["inputs"]["image"][0]]["class_type"] == "LoadImage":
                source = prompt[node["inputs"]["image"][0]]["inputs"]["image"]
                width, height = Image.open(COMFYUI_DIR / "input" / source).size
                for key in ("boxes", "points", "negative_points"):
                    node["inputs"][key] = resized_coordinates(node["inputs"][key], (side / width, side / height))
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = checkpoint_name
        elif random_weights and node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=side, height=side)
        elif node["class_type"] == "FastSAMLoader":
            node["inputs"]["model_name"] = fastsam_model(node["inputs"]["model_name"])
        elif random_weights and node["class_type"] in ("KSampler", "KSamplerAdvanced", "DDIMInversion",
                                                       "RecordContentFeatures"):
            node["inputs"]["steps"] = steps
        elif random_weights and node["class_type"] == "FitStyleLoRA":
            node["inputs"].update(steps=steps, resolution=side)
        elif random_weights and node["class_type"] == "LoadImage":
            node["inputs"]["image"] = small_copy_of_input(node["inputs"]["image"], side)
    queued = request(base, "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    prompt_id = queued["prompt_id"]
    while True:
        history = request(base, f"/history/{prompt_id}")
        if prompt_id in history:
            break
        time.sleep(0.5)
    entry = history[prompt_id]
    if entry["status"]["status_str"] != "success":
        errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
        raise SystemExit(f"{name} failed: {errors[0][1]['exception_message'] if errors else entry['status']}")
    return [
        OUTPUT_DIR / image["subfolder"] / image["filename"]
        for output in entry["outputs"].values()
        for image in output.get("images", [])
        if image.get("type", "output") == "output"  # not previews (a fit's loss curve)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", default=os.environ.get("ALL") == "1",
                        help="every SD1.5 example workflow, not only the default three (also ALL=1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the first default workflow only, at {QUICK_SIDE}x{QUICK_SIDE} and {QUICK_STEPS} steps "
                        "with random weights (the end-to-end test)")
    options = parser.parse_args()
    workflows = ALL_WORKFLOWS if options.all else DEFAULT_WORKFLOWS[:1] if options.quick else DEFAULT_WORKFLOWS
    side, steps = (QUICK_SIDE, QUICK_STEPS) if options.quick else (RANDOM_WEIGHTS_SIDE, RANDOM_WEIGHTS_STEPS)
    user_checkpoint = os.environ.get("CKPT")
    if user_checkpoint:
        checkpoint = Path(user_checkpoint).expanduser()
        if not checkpoint.is_file():
            raise SystemExit(f"CKPT={user_checkpoint}: no such file")
    else:
        make_random_checkpoint()
        checkpoint = RANDOM_CHECKPOINT
        print("NOTE: no CKPT given, so the checkpoint has RANDOM WEIGHTS: the images will be noise. The run shows")
        print("      the workflows executing end to end; for real pictures run  make demo CKPT=/path/to/sd15.safetensors")
    checkpoint_name = link_into_checkpoints(checkpoint)
    OUTPUT_DIR.mkdir(exist_ok=True)
    log_path = OUTPUT_DIR / "comfyui-demo.log"
    print(f"starting ComfyUI from {COMFYUI_DIR} (log: {log_path})", flush=True)
    began = time.time()
    with terminate_on_sigterm(), running_server(COMFYUI_DIR, log_path, ["--output-directory", str(OUTPUT_DIR)]) as server:
        base = server.base
        print(f"ComfyUI answered at {base} after {time.time() - began:.1f} s", flush=True)
        for number, name in enumerate(workflows, 1):
            print(f"[{number}/{len(workflows)}] {name} ...", flush=True)
            started = time.time()
            images = run_workflow(base, name, checkpoint_name, not user_checkpoint, side, steps)
            print(f"{name}: {len(images)} images in {time.time() - started:.1f} s", flush=True)
            for image in images:
                print(f"  {image}")
    print(f"demo done in {time.time() - began:.1f} s" + ("" if workflows is ALL_WORKFLOWS else
          f"; `make demo ALL=1` runs all {len(ALL_WORKFLOWS)} SD1.5 workflows"))


if __name__ == "__main__":
    main()
