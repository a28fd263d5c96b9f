"""Write NODES.md from the nodes' own schemas (what ComfyUI's /object_info serves), with the gallery.

    python scripts/nodes_doc.py            # rewrite NODES.md
    python scripts/nodes_doc.py --check    # exit 1 when NODES.md is out of date (the tests run this)

The gallery shows docs/gallery/*.jpg: the browser test's screenshots of the example workflows in the
real frontend (python scripts/nodes_doc.py --gallery copies them from output/screenshots/ first).
"""

import argparse
import importlib.util
import sys
import tempfile

import comfyui_host

REPO = comfyui_host.REPO
NODES_MD = REPO / "NODES.md"
GALLERY = REPO / "docs" / "gallery"
SCREENSHOTS = REPO / "output" / "screenshots"
GALLERY_WIDTH = 1200

# Which paper each node file brings into ComfyUI.
PAPERS = {
    "visual_style_prompting": "Visual Style Prompting with Swapping Self-Attention (Jeong et al. 2024)",
    "style_aligned": "Style Aligned Image Generation via Shared Attention (Hertz et al. 2024)",
    "reference": "the reference-image modes of Visual Style Prompting and StyleAligned",
    "reference_set": "several weighted style references for Visual Style Prompting and StyleAligned, mixed inside attention",
    "batch_prompts": "StyleAligned's prompt batches (a reference prompt and targets sharing a style description)",
    "ddim_inversion": "DDIM inversion (Song et al. 2021), the real-image entry of StyleAligned and VSP",
    "attention_maps": "Visual Style Prompting's attention-map visualisation, for every method",
    "fit_style_lora": "DiffStyler: Diffusion-based Localized Image Style Transfer (Li 2024), part 1: a style LoRA fitted on one image",
    "style_injection": "DiffStyler (Li 2024), part 2: the content injected plug-and-play (Tumanyan et al. 2023)",
    "content_features": "DiffStyler (Li 2024), part 2: the content's source branch recorded once for many styles",
    "fastsam": "DiffStyler (Li 2024), part 3: FastSAM masks (Zhao et al. 2023) chosen by box, point, number or word",
    "masked_style_blend": "DiffStyler (Li 2024), part 3: mask-wise style transfer, several styles in one image (eq. 7)",
    "stylediffusion": "StyleDiffusion: Prompt-Embedding Inversion for Text-Based Editing (Li et al. 2023), the inversion",
    "prompt_to_prompt": "StyleDiffusion (Li et al. 2023): prompt-to-prompt editing (Hertz et al. 2022) of the inverted real image, tau_v/tau_c/tau_s/tau_u",
}

CAPTIONS = {
    "template_browser": "The pack's workflows in the frontend's template browser (Templates, then style-attention-nodes)",
    "queued_visual_style_prompting_in_batch": "`visual_style_prompting_in_batch.json` after Run, at 128x128 and 3 "
    "steps with the random-weight checkpoint: the reference and two targets",
}


def load_pack():
    comfyui_host.prepare(cpu=True)  # only the schemas are read; no device is needed
    import folder_paths

    empty = tempfile.mkdtemp()  # file lists (Load Inversion's) must not depend on this machine's files
    folder_paths.set_input_directory(empty)
    folder_paths.set_output_directory(empty)
    spec = importlib.util.spec_from_file_location("style_attention_nodes", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    folder_paths.folder_names_and_paths["fastsam"] = ([empty], {".pt"})  # the loader's list: no file here either
    folder_paths.filename_list_cache.clear()
    return pack


def input_type(kind, options: dict) -> str:
    choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
    return "one of " + ", ".join(f"`{choice}`" for choice in choices) if choices else f"`{kind}`"


def default_text(options: dict) -> str:
    if "default" not in options:
        return ""
    value = options["default"]
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def node_section(cls) -> list[str]:
    info = cls.GET_NODE_INFO_V1()
    module = cls.__module__.rsplit(".", 1)[-1]
    lines = [f"## {info['display_name']} (`{info['name']}`)", "", info["description"], "",
             f"Implements: {PAPERS[module]}. Category: `{info['category']}`.", "",
             "| input | type | default | what it does |", "| --- | --- | --- | --- |"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            label = f"`{name}`" + (" (optional)" if section == "optional" else "")
            lines.append(f"| {label} | {input_type(spec[0], options)} | {default_text(options)} | {escape(options.get('tooltip', ''))} |")
    outputs = ", ".join(f"`{name}` ({kind})" for name, kind in zip(info["output_name"], info["output"]))
    lines += ["", f"Outputs: {outputs}.", ""]
    return lines


def gallery_section() -> list[str]:
    shots = sorted(GALLERY.glob("*.jpg"))
    if not shots:
        return []
    lines = ["# Gallery: the example workflows in the ComfyUI frontend", "",
             "Screenshots the browser test takes (headless Chromium, ComfyUI 0.3.75, frontend 1.32); the queued run "
             "used a checkpoint with random weights, so its image is noise.", ""]
    for shot in shots:
        caption = CAPTIONS.get(shot.stem, f"`example_workflows/{shot.stem}.json` as it opens")
        lines += [f"### {shot.stem}", "", caption + ".", "", f"![{shot.stem}]({shot.relative_to(REPO).as_posix()})", ""]
    return lines


def render(pack) -> str:
    lines = ["# Nodes", "", "Generated by `scripts/nodes_doc.py` from the node schemas; do not edit by hand.", ""]
    lines += [f"- [{cls.GET_NODE_INFO_V1()['display_name']}](#{anchor(cls)})" for cls in pack.nodes.NODES]
    lines.append("")
    for cls in pack.nodes.NODES:
        lines += node_section(cls)
    lines += gallery_section()
    return "\n".join(lines).rstrip() + "\n"


def anchor(cls) -> str:
    info = cls.GET_NODE_INFO_V1()
    heading = f"{info['display_name']} ({info['name']})".lower()
    return "".join(c for c in heading.replace(" ", "-") if c.isalnum() or c == "-")


def copy_gallery() -> None:
    import frontend

    shots = sorted(SCREENSHOTS.glob("*.png"))
    if not shots:
        raise SystemExit(f"no screenshots in {SCREENSHOTS}: run the browser test (make test) first")
    GALLERY.mkdir(parents=True, exist_ok=True)
    for shot in shots:
        frontend.save_as_jpeg(shot, GALLERY / f"{shot.stem}.jpg", GALLERY_WIDTH, quality=82)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when NODES.md is out of date")
    parser.add_argument("--gallery", action="store_true", help="refresh docs/gallery/ from output/screenshots/")
    options = parser.parse_args()
    if options.gallery:
        copy_gallery()
    text = render(load_pack())
    if options.check:
        if not NODES_MD.is_file() or NODES_MD.read_text() != text:
            raise SystemExit("NODES.md is out of date: run python scripts/nodes_doc.py")
        return
    NODES_MD.write_text(text)


if __name__ == "__main__":
    main()
