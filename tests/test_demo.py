"""`make demo` end to end: a real ComfyUI server, POST /prompt, the generated SD1.5-detected checkpoint."""

import re
import subprocess
import sys
from pathlib import Path

import comfy.sd
import comfy.supported_models
import demo
from conftest import COMFYUI_DIR, REPO


def test_the_random_checkpoint_is_detected_as_sd15():
    demo.make_random_checkpoint()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(demo.RANDOM_CHECKPOINT))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert clip is not None and vae is not None


def test_demo_runs_the_workflows_through_a_real_server_and_prints_the_images():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py")], capture_output=True, text=True,
                            env={"COMFYUI_DIR": str(COMFYUI_DIR), "PATH": "/usr/bin:/bin"}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RANDOM WEIGHTS" in result.stdout
    counts = dict(re.findall(r"^(\S+\.json): (\d+) images", result.stdout, flags=re.MULTILINE))
    assert set(counts) == set(demo.WORKFLOWS) and "visual_style_prompting_in_batch.json" in counts, result.stdout
    images = [Path(p) for p in re.findall(r"^\s+(/\S+\.png)$", result.stdout, flags=re.MULTILINE)]
    assert len(images) == sum(int(n) for n in counts.values()) > 0
    assert all(image.is_file() for image in images)
    server_log = (REPO / "output" / "comfyui-demo.log").read_text()
    (import_line,) = [line for line in server_log.splitlines() if line.rstrip().endswith("custom_nodes/style-attention-nodes")]
    assert "IMPORT FAILED" not in import_line
