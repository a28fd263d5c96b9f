"""`make demo` end to end: a real ComfyUI server, POST /prompt, the generated SD1.5-detected checkpoint."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import comfy.sd
import comfy.supported_models
import pytest

import demo
from conftest import COMFYUI_DIR, REPO

# --quick: one workflow at 128x128, 3 steps (the whole demo's goal is 5 minutes on 2 cores; the test
# runs its path through the server, the other workflows run in-process in test_example_workflows.py).
# A busy CI machine gets ten times what it takes here.
DEMO_LIMIT_S = 600


def test_the_random_checkpoint_is_detected_as_sd15():
    demo.make_random_checkpoint()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(demo.RANDOM_CHECKPOINT))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert clip is not None and vae is not None


def run_in_own_process_group(command: list[str], env: dict, timeout: float) -> tuple[int, str, str]:
    """Runs command; whatever happens (timeout, failure, Ctrl-C) its whole process group, the
    server it started included, is killed before this returns or raises."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


@pytest.mark.end_to_end
@pytest.mark.timeout(DEMO_LIMIT_S + 60)
def test_demo_runs_the_workflows_through_a_real_server_and_prints_the_images():
    env = {"COMFYUI_DIR": str(COMFYUI_DIR), "PATH": "/usr/bin:/bin"}
    code, stdout, stderr = run_in_own_process_group([sys.executable, str(REPO / "scripts" / "demo.py"), "--quick"],
                                                    env, DEMO_LIMIT_S)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "RANDOM WEIGHTS" in stdout
    announced = re.findall(r"^\[(\d+)/(\d+)\] (\S+\.json) \.\.\.$", stdout, flags=re.MULTILINE)
    assert [name for _, _, name in announced] == demo.DEFAULT_WORKFLOWS[:1], stdout
    counts = dict(re.findall(r"^(\S+\.json): (\d+) images in [\d.]+ s$", stdout, flags=re.MULTILINE))
    assert list(counts) == demo.DEFAULT_WORKFLOWS[:1], stdout
    images = [Path(p) for p in re.findall(r"^\s+(/\S+\.png)$", stdout, flags=re.MULTILINE)]
    assert len(images) == sum(int(n) for n in counts.values()) > 0
    assert all(image.is_file() for image in images)
    assert re.search(r"^demo done in [\d.]+ s; `make demo ALL=1` runs all \d+ SD1.5 workflows$", stdout, re.MULTILINE)
    server_log = (REPO / "output" / "comfyui-demo.log").read_text()
    (import_line,) = [line for line in server_log.splitlines() if line.rstrip().endswith("custom_nodes/style-attention-nodes")]
    assert "IMPORT FAILED" not in import_line


def test_the_demo_offers_every_sd15_workflow_and_defaults_to_three():
    assert set(demo.DEFAULT_WORKFLOWS) < set(demo.ALL_WORKFLOWS)
    other_models = ("sdxl", "flux", "sd35", "qwen_image", "z_image")
    assert not any(model in name for name in demo.ALL_WORKFLOWS for model in other_models)
    assert demo.ALL_WORKFLOWS == sorted(p.name for p in (REPO / "example_workflows").glob("*.json")
                                        if not any(model in p.name for model in other_models))
