"""Every example workflow in the real ComfyUI frontend, in headless Chromium (Debian's, driven by Playwright).

One real server with the pack; each workflow is opened through the frontend's own file input (what
Workflow > Open does), must load with every node known and no dialog, and is screenshotted into
output/screenshots/. One workflow is queued with the Run button and must produce its image.
"""

import json
import time
import urllib.request

import pytest

import demo
import frontend
from comfyui_server import request as server_request, running_server
from conftest import COMFYUI_DIR, REPO

pytestmark = pytest.mark.end_to_end

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
SCREENSHOTS = REPO / "output" / "screenshots"
QUEUED_WORKFLOW = "visual_style_prompting_in_batch.json"
PACK_FOLDER = "style-attention-nodes"

# Settings a first visit would otherwise answer with dialogs (the new-user template browser).
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True, "Comfy.Minimap.Visible": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    demo.make_random_checkpoint()
    checkpoint_name = demo.link_into_checkpoints(demo.RANDOM_CHECKPOINT)
    log_path = tmp_path_factory.mktemp("server") / "comfyui.log"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with running_server(COMFYUI_DIR, log_path) as server:
        base = server.base
        for setting, value in SETTINGS.items():
            request = urllib.request.Request(f"{base}/settings/{setting}", data=json.dumps(value).encode(),
                                             method="POST")
            urllib.request.urlopen(request, timeout=30).close()
        yield base, checkpoint_name


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # large enough that the wider graphs are drawn in full detail
        context = frontend.launch(playwright, str(tmp_path_factory.mktemp("chromium-profile")),
                                  {"width": 2200, "height": 1300})
        try:
            yield context
        finally:
            context.close()


def wait_for_new_prompt(base: str, known: set, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server_request(base, "/history")
        done = [prompt_id for prompt_id in set(history) - known if history[prompt_id]["status"].get("completed")]
        if done:
            return done[0]
        time.sleep(1)
    raise AssertionError(f"no queued prompt finished within {timeout} s (queue: {server_request(base, '/queue')})")


def visible_dialogs(page) -> list[str]:
    """Dialogs and toasts on screen (the frontend reports a workflow that fails its schema in a toast)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('.p-dialog, [role=dialog], .p-toast-message')]
                .filter(d => d.offsetParent !== null || d.getClientRects().length > 0)
                .map(d => d.innerText.slice(0, 300))"""
    )


def unknown_nodes(page) -> list[str]:
    return page.evaluate(
        "() => window.app.graph.nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]"
        " || n.has_errors).map(n => n.type)"
    )


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.stem)
def test_each_example_workflow_loads_in_the_frontend(server, browser, workflow):
    base, _ = server
    page, errors = frontend.open_frontend(browser, base)
    try:
        frontend.open_workflow(page, workflow)
        assert unknown_nodes(page) == []
        assert visible_dialogs(page) == []
        frontend.fit_view(page)
        page.screenshot(path=str(SCREENSHOTS / f"{workflow.stem}.png"))
        assert errors == []
    finally:
        page.close()


def test_a_workflow_queued_with_the_run_button_produces_its_image(server, browser):
    base, checkpoint_name = server
    page, errors = frontend.open_frontend(browser, base)
    try:
        frontend.open_workflow(page, REPO / "example_workflows" / QUEUED_WORKFLOW)
        page.evaluate(
            """([checkpoint]) => {
                for (const node of window.app.graph.nodes) {
                    const set = (name, value) => { const w = node.widgets?.find(w => w.name === name); if (w) w.value = value; };
                    if (node.type === 'CheckpointLoaderSimple') set('ckpt_name', checkpoint);
                    if (node.type === 'EmptyLatentImage') { set('width', 128); set('height', 128); }
                    if (node.type === 'KSampler') set('steps', 3);
                }
            }""",
            [checkpoint_name],
        )
        history_before = set(server_request(base, "/history"))
        page.get_by_role("button", name="Run", exact=True).first.click()
        prompt_id = wait_for_new_prompt(base, history_before, timeout=300)
        history = server_request(base, "/history")
        entry = history[prompt_id]
        assert entry["status"]["status_str"] == "success", entry["status"]
        images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
        assert images and all(image["type"] == "output" for image in images)
        frontend.fit_view(page)
        page.wait_for_timeout(1000)  # the frontend draws the result into the Save Image node
        page.screenshot(path=str(SCREENSHOTS / "queued_visual_style_prompting_in_batch.png"))
        assert visible_dialogs(page) == [] and errors == []
    finally:
        page.close()


def test_the_workflows_are_offered_in_the_template_browser(server, browser):
    base, _ = server
    templates = server_request(base, "/api/workflow_templates")
    assert sorted(templates[PACK_FOLDER]) == sorted(path.stem for path in WORKFLOWS)
    page, errors = frontend.open_frontend(browser, base)
    try:
        page.get_by_role("button", name="Templates").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text(PACK_FOLDER).first.wait_for(timeout=30_000)
        dialog.get_by_text(PACK_FOLDER).first.click()
        page.wait_for_timeout(1500)  # thumbnails
        text = dialog.inner_text()
        assert all(path.stem in text for path in WORKFLOWS), text
        page.screenshot(path=str(SCREENSHOTS / "template_browser.png"))
        dialog.get_by_text(QUEUED_WORKFLOW.removesuffix(".json"), exact=True).first.click()
        frontend.wait_for_workflow(page, REPO / "example_workflows" / QUEUED_WORKFLOW)
        assert unknown_nodes(page) == [] and errors == []
    finally:
        page.close()
