"""The Qwen-Image style oracles (tests/oracles/qwen_style.py) on the twin: switched off or styled toward
themselves they are the plain twin; otherwise they change the targets and keep the reference; an external
recorded reference replays the in-batch one; each chunk has its own reference; text and extra rows keep their own."""

import pytest
import torch

from comfy.ldm.flux.math import apply_rope1
from helpers import relative_error
from oracles.qwen_style import record_reference, with_style_aligned, with_vsp
from support.qwen_twin import build, inputs, ref_latent, twin_denoise

ALL = [0, 1]
METHODS = {"vsp": lambda twin, blocks, **kw: with_vsp(twin, blocks, **kw),
           "style_aligned": lambda twin, blocks, **kw: with_style_aligned(twin, blocks, **kw),
           "style_aligned_1.1": lambda twin, blocks, **kw: with_style_aligned(twin, blocks, style_factor=1.1, **kw),
           "style_aligned_same_positions": lambda twin, blocks, **kw: with_style_aligned(twin, blocks, shift=False,
                                                                                        **kw)}


@pytest.fixture
def twin():
    return build()[1]


def plain_and(twin, styled, x, timestep, context, **kwargs):
    """The twin's output with diffusers' own processors, then under the styled context manager."""
    plain = twin_denoise(twin, x, timestep, context, **kwargs)
    with styled:
        return plain, twin_denoise(twin, x, timestep, context, **kwargs)


def same_rows(batch, height=10, width=14, tokens=5, seed=2):
    """A batch of one latent, timestep and prompt repeated: every row its own reference's twin."""
    x, timestep, context = inputs(1, height, width, tokens, seed)
    return x.expand(batch, -1, -1, -1, -1), timestep.expand(batch), context.expand(batch, -1, -1)


@pytest.mark.parametrize("oracle", ["vsp_strength_0", "vsp_no_blocks", "style_aligned_no_blocks",
                                    "style_aligned_reference_alone", "vsp_toward_itself",
                                    "style_aligned_unshared_toward_itself", "vsp_external_itself",
                                    "style_aligned_unshared_external_itself"])
def test_oracles_switched_off_or_toward_themselves_are_the_plain_twin(twin, oracle):
    x, timestep, context = same_rows(3) if "itself" in oracle else inputs(3, 10, 14, tokens=5, seed=2)
    if oracle == "style_aligned_reference_alone":
        x, timestep, context = x[:1], timestep[:1], context[:1]
    reference = None
    if "external" in oracle:
        reference = record_reference(twin, ALL, lambda: twin_denoise(twin, x[:1], timestep[:1], context[:1]))
    styled = {"vsp_strength_0": lambda: with_vsp(twin, ALL, strength=0.0),  # the oracle's own attention everywhere
              "vsp_no_blocks": lambda: with_vsp(twin, []),
              "style_aligned_no_blocks": lambda: with_style_aligned(twin, []),
              "style_aligned_reference_alone": lambda: with_style_aligned(twin, ALL),
              "vsp_toward_itself": lambda: with_vsp(twin, ALL),
              "style_aligned_unshared_toward_itself": lambda: with_style_aligned(twin, ALL, share=False),
              "vsp_external_itself": lambda: with_vsp(twin, ALL, reference=reference),
              "style_aligned_unshared_external_itself": lambda: with_style_aligned(
                  twin, ALL, share=False, reference=reference)}[oracle]()
    plain, actual = plain_and(twin, styled, x, timestep, context)
    assert relative_error(actual, plain) <= 1e-5
    assert torch.equal(twin_denoise(twin, x, timestep, context), plain)  # processors restored


@pytest.mark.parametrize("method", METHODS)
def test_oracles_change_the_targets_and_keep_the_reference(twin, method):
    x, timestep, context = inputs(3, 10, 14, tokens=5, seed=3)
    plain, actual = plain_and(twin, METHODS[method](twin, ALL), x, timestep, context)
    assert relative_error(actual[:1], plain[:1]) <= 1e-6  # the reference row runs plain attention throughout
    for row in (1, 2):
        assert relative_error(actual[row], plain[row]) > 1e-2


def test_shared_keys_toward_an_identical_reference_still_act(twin):
    """Sharing alone moves a target whose reference is itself: the appended keys are one image width away
    (or at the same positions), scaled by the style factor; unshared (AdaIN alone) it would not move."""
    x, timestep, context = same_rows(2)
    outputs = {}
    for name, options in (("beside", {}), ("same", {"shift": False}), ("beside_1.1", {"style_factor": 1.1})):
        with with_style_aligned(twin, ALL, **options):
            outputs[name] = twin_denoise(twin, x, timestep, context)
    plain = twin_denoise(twin, x, timestep, context)
    for name, out in outputs.items():
        assert relative_error(out[:1], plain[:1]) <= 1e-6 and relative_error(out[1], plain[1]) > 1e-3, name
    assert relative_error(outputs["beside"][1], outputs["same"][1]) > 1e-3
    assert relative_error(outputs["beside"][1], outputs["beside_1.1"][1]) > 1e-3


def test_vsp_strength_and_blocks_matter(twin):
    x, timestep, context = inputs(2, 12, 12, tokens=6, seed=4)
    outputs = {}
    for name, blocks, strength in (("full", ALL, 1.0), ("half", ALL, 0.5), ("last", [1], 1.0)):
        with with_vsp(twin, blocks, strength=strength):
            outputs[name] = twin_denoise(twin, x, timestep, context)[1]
    plain = twin_denoise(twin, x, timestep, context)[1]
    assert 1e-3 < relative_error(outputs["half"], plain) < relative_error(outputs["full"], plain)
    assert 1e-3 < relative_error(outputs["last"], plain) < relative_error(outputs["full"], plain)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("extra", [False, True], ids=["image", "with_ref_latent"])
def test_external_reference_replays_the_in_batch_reference(twin, method, extra):
    """Row 0 recorded alone then replayed for rows 1.. gives what rows 1.. get with row 0 in their batch."""
    x, timestep, context = inputs(3, 10, 14, tokens=5, seed=5)
    kwargs = {"ref_latents": [ref_latent(3)]} if extra else {}
    blocks = [1]
    with METHODS[method](twin, blocks):
        in_batch = twin_denoise(twin, x, timestep, context, **kwargs)
    reference = record_reference(twin, blocks, lambda: twin_denoise(twin, x[:1], timestep[:1], context[:1], **{
        k: [r[:1] for r in v] for k, v in kwargs.items()}))
    assert set(reference.blocks) == set(blocks) and reference.blocks[1]["k"].shape[2] == 5 * 7  # image rows only
    kwargs = {k: [r[1:] for r in v] for k, v in kwargs.items()}
    with METHODS[method](twin, blocks, reference=reference):
        replayed = twin_denoise(twin, x[1:], timestep[1:], context[1:], **kwargs)
    assert relative_error(replayed, in_batch[1:]) <= 1e-5
    assert relative_error(replayed, twin_denoise(twin, x[1:], timestep[1:], context[1:], **kwargs)) > 1e-3


@pytest.mark.parametrize("method", ["vsp", "style_aligned"])
def test_external_reference_of_another_size_and_prompt_length(twin, method):
    x, timestep, context = inputs(2, 10, 14, tokens=5, seed=6)
    ref_x, ref_t, ref_context = inputs(1, 8, 12, tokens=9, seed=7)
    reference = record_reference(twin, ALL, lambda: twin_denoise(twin, ref_x, ref_t, ref_context))
    assert reference.blocks[0]["k"].shape[2] == 4 * 6 and reference.cols == 6  # the reference's own image rows
    plain, actual = plain_and(twin, METHODS[method](twin, ALL, reference=reference), x, timestep, context)
    assert actual.shape == plain.shape and torch.isfinite(actual).all()
    for row in (0, 1):  # every row is a target
        assert relative_error(actual[row], plain[row]) > 1e-2


@pytest.mark.parametrize("method", ["vsp", "style_aligned"])
def test_chunks_each_have_their_reference(twin, method):
    """[ref a, target a, ref b, target b] in 2 chunks: what [ref a, target a] and [ref b, target b] give apart."""
    x, timestep, context = inputs(4, 10, 14, tokens=5, seed=9)
    with METHODS[method](twin, ALL, chunks=2):
        together = twin_denoise(twin, x, timestep, context)
    with METHODS[method](twin, ALL):
        apart = torch.cat([twin_denoise(twin, x[i:i + 2], timestep[i:i + 2], context[i:i + 2]) for i in (0, 2)])
    assert relative_error(together, apart) <= 1e-5
    with METHODS[method](twin, ALL):  # one chunk: rows 2 and 3 follow row 0 instead
        assert relative_error(twin_denoise(twin, x, timestep, context)[2:], apart[2:]) > 1e-2


@pytest.mark.parametrize("method", ["vsp", "style_aligned_unshared"])
def test_text_and_extra_rows_keep_their_own(twin, method):
    """Rows of one image latent and timestep but their own prompts and reference latents: at the first block their
    image rows are alike, so VSP (row 1's image keys and values become row 0's) and unshared AdaIN (toward row 0's
    statistics) change nothing there, while swapping or normalising text or extra rows would."""
    x, timestep, _ = same_rows(2)
    context = inputs(2, 10, 14, tokens=5, seed=11)[2]
    refs = [torch.cat([ref_latent(1, seed=12), ref_latent(1, seed=13)])]
    styled = with_vsp(twin, [0]) if method == "vsp" else with_style_aligned(twin, [0], share=False)
    plain, actual = plain_and(twin, styled, x, timestep, context, ref_latents=refs)
    assert relative_error(plain[1], plain[0]) > 1e-2  # the rows do differ
    assert relative_error(actual, plain) <= 1e-6


def attention_call(twin, block, run):
    """The kwargs and output of one block's attention during run()."""
    seen = {}
    hook = twin.transformer_blocks[block].attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(kwargs=kwargs, out=out), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("shift,factor", [(True, 1.0), (True, 1.1), (False, 1.0)], ids=["beside", "beside_1.1", "same"])
def test_style_aligned_by_hand_with_comfyui_positions(twin, shift, factor):
    """Block 1 of [reference, target] written out once more from the brief, with ComfyUI's own RoPE (pe_embedder
    at hand-made ids, apply_rope1) on a 5 x 7 token grid: AdaIN before RoPE, the shared keys one width right."""
    model = build()[0]
    dit = model.model.diffusion_model
    x, timestep, context = inputs(2, 10, 14, tokens=5, seed=14)
    with with_style_aligned(twin, [1], style_factor=factor, shift=shift):
        seen = attention_call(twin, 1, lambda: twin_denoise(twin, x, timestep, context))
    attn, kw = twin.transformer_blocks[1].attn, seen["kwargs"]

    def heads(t):
        return t.unflatten(-1, (2, -1)).transpose(1, 2)

    image, text = kw["hidden_states"], kw["encoder_hidden_states"]
    q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(text))), attn.norm_q(heads(attn.to_q(image)))], 2)
    k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(text))), attn.norm_k(heads(attn.to_k(image)))], 2)
    v = torch.cat([heads(attn.add_v_proj(text)), heads(attn.to_v(image))], 2)
    rows, cols, start = 5, 7, 3  # txt_start = max(5 // 2, 7 // 2)
    grid = torch.stack(torch.meshgrid(torch.arange(rows) - 2, torch.arange(cols) - 3, indexing="ij"), -1).reshape(-1, 2)
    ids = torch.cat([torch.arange(start, start + 5)[:, None].expand(-1, 3),
                     torch.cat([torch.zeros(35, 1), grid], 1)]).float()
    shared_ids = ids[5:].clone()
    shared_ids[:, 2] += cols if shift else 0

    def adain(a, b):
        return (a - a.mean(-2, True)) / (a.var(-2, keepdim=True) + 1e-5).sqrt() * (
            b.var(-2, keepdim=True) + 1e-5).sqrt() + b.mean(-2, True)

    pe, pe_shared = dit.pe_embedder(ids[None]), dit.pe_embedder(shared_ids[None])
    q1 = torch.cat([q[1:, :, :5], adain(q[1:, :, 5:], q[:1, :, 5:])], 2)
    k1 = torch.cat([k[1:, :, :5], adain(k[1:, :, 5:], k[:1, :, 5:])], 2)
    keys = torch.cat([apply_rope1(k1, pe), factor * apply_rope1(k[:1, :, 5:], pe_shared)], 2)
    weights = torch.softmax(apply_rope1(q1, pe) @ keys.transpose(-1, -2) / 32 ** 0.5, -1)
    out = (weights @ torch.cat([v[1:], v[:1, :, 5:]], 2)).transpose(1, 2).flatten(2)
    target = (attn.to_out[0](out[:, 5:]), attn.to_add_out(out[:, :5]))
    plain = torch.softmax(apply_rope1(q[:1], pe) @ apply_rope1(k[:1], pe).transpose(-1, -2) / 32 ** 0.5, -1) @ v[:1]
    plain = plain.transpose(1, 2).flatten(2)
    reference = (attn.to_out[0](plain[:, 5:]), attn.to_add_out(plain[:, :5]))
    for part in (0, 1):  # image rows, text rows
        assert relative_error(seen["out"][part][1:], target[part]) <= 1e-5
        assert relative_error(seen["out"][part][:1], reference[part]) <= 1e-5
