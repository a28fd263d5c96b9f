"""One batched CONDITIONING for a reference prompt and several target prompts (batch item i gets prompt i)."""


from comfy_api.latest import io

from ..attention_patches.prompt_batch import stack_token_sequences


def compose_prompt(prompt: str, style_description: str) -> str:
    prompt, style_description = prompt.strip(), style_description.strip()
    return f"{prompt}, {style_description}" if prompt and style_description else prompt or style_description


class ReferenceTargetPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ReferenceTargetPrompts",
            display_name="Reference + Target Prompts (Batch)",
            category="style_attention/conditioning",
            description="Encodes the reference prompt as batch item 0 and each target prompt as the next "
            "items, for in-batch style references. Set the latent batch size to the batch_size output.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model you sample with."),
                io.String.Input("reference_prompt", multiline=True, default="a cat",
                                tooltip="Prompt of batch item 0, the reference."),
                io.String.Input("target_prompts", multiline=True, default="a dog\na house",
                                tooltip="One prompt per line; each line is one more batch item."),
                io.String.Input("style_description", multiline=False, default="",
                                tooltip="Appended to every prompt, e.g. 'watercolor painting'."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning"),
                io.Int.Output(display_name="batch_size"),
            ],
        )

    @classmethod
    def execute(cls, clip, reference_prompt, target_prompts, style_description) -> io.NodeOutput:
        targets = [line for line in target_prompts.splitlines() if line.strip()]
        if not targets:
            raise ValueError("target_prompts: expected at least one non-empty line")
        prompts = [compose_prompt(p, style_description) for p in [reference_prompt, *targets]]
        encoded = [clip.encode_from_tokens_scheduled(clip.tokenize(p))[0] for p in prompts]
        extras = {}
        pooled = [entry[1].get("pooled_output") for entry in encoded]
        if all(p is not None for p in pooled):
            extras["pooled_output"] = stack_token_sequences([p.unsqueeze(1) for p in pooled]).squeeze(1)
        conditioning = [[stack_token_sequences([entry[0] for entry in encoded]), extras]]
        return io.NodeOutput(conditioning, len(prompts))
