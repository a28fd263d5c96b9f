"""Turn a UI-format workflow (what the ComfyUI frontend saves) into the API format POST /prompt takes.

Widget values are matched to input names with the node schemas of a running ComfyUI (its
/object_info, or INPUT_TYPES in-process), the way the frontend does it: widget inputs in schema
order, with the extra values of seed-control and upload widgets skipped.
"""

from collections.abc import Callable

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DOCUMENTATION_NODES = {"Note", "MarkdownNote"}
MUTED_MODE = 2

InputSpec = tuple[str, object, dict]  # (name, type or combo options, options)


class WorkflowError(ValueError):
    pass


def schema_inputs(input_types: dict) -> list[InputSpec]:
    """Inputs in the order the frontend lays out widgets, from an INPUT_TYPES / object_info "input" dict."""
    specs = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, spec[0], options))
    return specs


def is_widget(input_type, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(input_type, list) or input_type in WIDGET_TYPES


def companion_widgets(name: str, options: dict) -> int:
    """Widgets the frontend adds after an input's own (seed control, upload button), which save a value too."""
    control = options.get("control_after_generate")
    has_control = name in ("seed", "noise_seed") if control is None else bool(control)
    has_upload = any(options.get(kind) for kind in ("image_upload", "video_upload", "audio_upload"))
    return int(has_control) + int(has_upload)


def ui_to_api(workflow: dict, node_inputs: Callable[[str], list[InputSpec]]) -> dict:
    links = {link[0]: (link[1], link[2]) for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        class_type = node["type"]
        if class_type in DOCUMENTATION_NODES or node.get("mode", 0) == MUTED_MODE:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node['id']} ({class_type}): bypassed nodes are not supported")
        linked = {
            socket["name"]: [str(links[socket["link"]][0]), links[socket["link"]][1]]
            for socket in node.get("inputs", [])
            if socket.get("link") is not None
        }
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, input_type, options in node_inputs(class_type):
            if is_widget(input_type, options):
                if not values:
                    raise WorkflowError(f"node {node['id']} ({class_type}): no widget value left for {name!r}")
                inputs[name] = values.pop(0)
                del values[: companion_widgets(name, options)]
            if name in linked:
                inputs[name] = linked[name]
        if values:
            raise WorkflowError(f"node {node['id']} ({class_type}): {len(values)} widget values left over: {values}")
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    return prompt
