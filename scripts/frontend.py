"""The real ComfyUI frontend in headless Chromium: Debian's chromium driven by Playwright (browsers
cannot be downloaded here), shared by the browser test and the workflow tidier."""

import json
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def launch(playwright, profile_dir: str, viewport: dict):
    """A persistent context on a fresh profile directory."""
    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium package")
    return playwright.chromium.launch_persistent_context(profile_dir, executable_path=str(CHROMIUM), headless=True,
                                                         args=CHROMIUM_FLAGS, viewport=viewport)


def open_frontend(context, base: str):
    """A page with the frontend loaded; returns (page, uncaught page errors as they come)."""
    page = context.new_page()
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # an announcement banner
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(base)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    page.wait_for_timeout(1000)
    close_dialogs(page)
    return page, errors


DIALOGS = ".p-dialog, [role=dialog]"


def close_dialogs(page) -> None:
    """Newer frontends greet a new user with the template browser over the canvas (sometimes seconds
    late): Escape closes it."""
    page.wait_for_timeout(1000)
    for _ in range(6):
        if not page.locator(DIALOGS).count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)


def open_workflow(page, path: Path) -> None:
    """Through the frontend's file input: the path Workflow > Open takes."""
    page.set_input_files("#comfy-file-input", str(path))
    wait_for_workflow(page, path)


def wait_for_workflow(page, path: Path) -> None:
    """Until the graph holds the workflow's nodes."""
    page.wait_for_function(
        "expected => window.app.graph.nodes.length === expected", arg=len(json.loads(path.read_text())["nodes"]),
        timeout=60_000,
    )
    page.wait_for_timeout(500)


def fit_view(page) -> None:
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(500)


def save_as_jpeg(screenshot: Path, jpeg: Path, width: int, quality: int) -> None:
    from PIL import Image

    image = Image.open(screenshot).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.save(jpeg, quality=quality, optimize=True)
