"""Several style references with a weight each, as one STYLE_REFERENCE for Visual Style Prompting and
StyleAligned (glue/references.py's ReferenceSet; attention_patches/reference_set.py how they act)."""

from comfy_api.latest import io

from ..glue.references import MAX_REFERENCES, combined
from .io_types import StyleReference

SLOTS = 4
WEIGHT_TOOLTIP = (
    "How much attention this reference gets: it acts as this many copies of its keys (its attention scores "
    "shifted by log(weight)). Weights that sum to 1 give the references together the attention of one reference; "
    "1 each is every reference at full strength (StyleAligned's plain concatenation). 0 leaves it out."
)


def slot_inputs(number: int, optional: bool) -> list:
    return [
        StyleReference.Input(f"reference_{number}", optional=optional,
                             tooltip="A Style Reference (Latent) or (Inversion), or another Combine Style References "
                             "(its references join with their weights times this one's)."),
        io.Float.Input(f"weight_{number}", default=1.0, min=0.0, max=100.0, step=0.05, tooltip=WEIGHT_TOOLTIP),
    ]


class CombineStyleReferences(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CombineStyleReferences",
            display_name="Combine Style References",
            category="style_attention/reference",
            description="Several style references at once, each with a weight, for Visual Style Prompting and "
            "StyleAligned: the styled layers attend to every reference's keys and values, each weighted inside "
            "attention; StyleAligned's AdaIN moves toward the references' mixture statistics. Each reference keeps "
            f"its own cache budget; at most {MAX_REFERENCES} different references.",
            inputs=[
                *slot_inputs(1, optional=False),
                *slot_inputs(2, optional=False),
                *(entry for number in range(3, SLOTS + 1) for entry in slot_inputs(number, optional=True)),
            ],
            outputs=[StyleReference.Output(display_name="references")],
        )

    @classmethod
    def execute(cls, reference_1, weight_1, reference_2, weight_2, reference_3=None, weight_3=1.0, reference_4=None,
                weight_4=1.0) -> io.NodeOutput:
        given = [(reference_1, weight_1), (reference_2, weight_2), (reference_3, weight_3), (reference_4, weight_4)]
        return io.NodeOutput(combined([(reference, weight) for reference, weight in given if reference is not None]))
