"""Lay out the example workflows the way the real frontend draws them, and refresh their thumbnails.

Each workflow is opened in the ComfyUI frontend (headless Chromium, a real server with this pack):
nodes grow to the size the frontend computes for them, columns are spaced by their widest node and
nodes in a column stacked so none overlaps; the new positions and sizes and the fitted view are
written back (nothing else in the file changes), and a screenshot becomes the template thumbnail
(<name>.jpg).

    .venv/bin/python scripts/hosts.py run scripts/tidy_workflows.py [name.json ...]
"""

import json
import sys
import tempfile
from pathlib import Path

import frontend
from comfyui_host import COMFYUI_DIR
from comfyui_server import running_server

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
THUMBNAIL_WIDTH = 640
SAVED_VIEWPORT = {"width": 1600, "height": 900}  # the view the workflows open with fits a laptop's browser
THUMBNAIL_VIEWPORT = {"width": 2560, "height": 1440}
GAP = 50

LAYOUT = """(gap) => {
    const graph = window.app.graph;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    for (const node of graph.nodes) {
        const needed = node.computeSize();
        node.size[0] = Math.max(node.size[0], needed[0]);
        node.size[1] = Math.max(node.size[1], needed[1]);
    }
    const columns = [...new Set(graph.nodes.map(node => node.pos[0]))].sort((a, b) => a - b);
    let x = Math.min(...columns);
    for (const column of columns) {
        const nodes = graph.nodes.filter(node => node.pos[0] === column).sort((a, b) => a.pos[1] - b.pos[1]);
        let y = -Infinity;
        for (const node of nodes) {
            node.pos[0] = x;
            node.pos[1] = Math.max(node.pos[1], y);
            y = node.pos[1] + node.size[1] + title + gap / 2;
        }
        x += Math.max(...nodes.map(node => node.size[0])) + gap;
    }
    graph.setDirtyCanvas(true, true);
}"""
PLACES = """() => Object.fromEntries(window.app.graph.nodes.map(node => [node.id, [[...node.pos], [...node.size]]]))"""
NODES_ON_SCREEN = """(padding) => {
    const {scale, offset} = window.app.canvas.ds;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = window.app.graph.nodes;
    const left = Math.min(...nodes.map(n => n.pos[0])), top = Math.min(...nodes.map(n => n.pos[1] - title));
    const right = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
    const bottom = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
    const box = window.app.canvas.canvas.getBoundingClientRect();
    return {x: box.left + (left + offset[0]) * scale - padding, y: box.top + (top + offset[1]) * scale - padding,
            width: (right - left) * scale + 2 * padding, height: (bottom - top) * scale + 2 * padding};
}"""
VIEW = """() => ({scale: window.app.canvas.ds.scale, offset: [...window.app.canvas.ds.offset]})"""


def fitted_view(page, viewport: dict) -> dict:
    page.set_viewport_size(viewport)
    page.wait_for_timeout(300)
    frontend.fit_view(page)
    return page.evaluate(VIEW)


def tidy(page, path: Path) -> None:
    frontend.open_workflow(page, path)
    page.evaluate(LAYOUT, GAP)
    workflow = json.loads(path.read_text())
    places = page.evaluate(PLACES)
    for node in workflow["nodes"]:
        node["pos"], node["size"] = ([round(v) for v in values] for values in places[str(node["id"])])
    workflow.setdefault("extra", {})["ds"] = fitted_view(page, SAVED_VIEWPORT)
    path.write_text(json.dumps(workflow, indent=2) + "\n")
    fitted_view(page, THUMBNAIL_VIEWPORT)  # a large canvas draws the nodes in full detail
    frontend.close_dialogs(page)  # the template greeting can open late, over the canvas
    shot = Path(tempfile.mkstemp(suffix=".png")[1])
    page.screenshot(path=str(shot), clip=page.evaluate(NODES_ON_SCREEN, 30))
    frontend.save_as_jpeg(shot, path.with_suffix(".jpg"), THUMBNAIL_WIDTH, quality=85)
    shot.unlink()


def main() -> None:
    from playwright.sync_api import sync_playwright

    names = sys.argv[1:] or sorted(p.name for p in WORKFLOWS.glob("*.json"))
    log = Path(tempfile.mkdtemp()) / "comfyui.log"
    with running_server(COMFYUI_DIR, log) as server, sync_playwright() as playwright, \
            tempfile.TemporaryDirectory() as profile:
        context = frontend.launch(playwright, profile, THUMBNAIL_VIEWPORT)
        page, _ = frontend.open_frontend(context, server.base)
        for name in names:
            tidy(page, WORKFLOWS / name)
            print(f"tidied {name}")
        context.close()


if __name__ == "__main__":
    main()
