"""The pure functions in float16 and bfloat16, with statistics large enough to overflow float16.

Each half-precision result is compared with the same computation in float64 on the same (already
rounded) inputs (the function itself on float64 tensors, which it keeps in float64, or attention maps
written out here; the DDIM walk with its float32 walk), so only the function's own arithmetic is
measured, as a relative error ||a - b|| / ||b||. A result computed in float32 and rounded once to
the input's dtype is within the unit roundoff u of the exact one (u = 2^-11 = 4.9e-4 in float16,
2^-8 = 3.9e-3 in bfloat16, each element and so in norm); the tolerances are 2u. Scalars the pack keeps in float32 (losses, maps)
are held to float32's arithmetic error instead. float32 results are checked bit for bit against the
formula as it was before the half-precision work, written out here.
"""

import math

import pytest
import torch

from conftest import pack_submodule

pytestmark = pytest.mark.one_host

attention = pack_submodule("attention_patches.attention")
attention_maps = pack_submodule("attention_patches.attention_maps")
attention_probe = pack_submodule("attention_patches.attention_probe")
color_calibration = pack_submodule("attention_patches.color_calibration")
local_blend = pack_submodule("attention_patches.local_blend")
precision = pack_submodule("attention_patches.precision")
reference = pack_submodule("attention_patches.reference")
shared_attention = pack_submodule("attention_patches.shared_attention")
ddim = pack_submodule("inversion.ddim")
objective = pack_submodule("lora_fit.objective")

TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # 2u: one rounding to the dtype
HALF = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
TOKENS = 4096  # SD1.5 at 512 px, SDXL at 1024 px: std 8 here overflows a float16 sum of squares


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def activations(*shape, std: float, seed: int) -> torch.Tensor:
    """Gaussian activations of the given std, each channel with its own mean (std 3)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * std + torch.randn(shape[0], 1, shape[-1], generator=g) * 3


def exact_maps(query, key, heads: int, bias=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) averaged over heads, in float64: (batch, queries, keys)."""
    batch, queries, inner = query.shape
    q = query.double().reshape(batch, queries, heads, -1).transpose(1, 2)
    k = key.double().reshape(batch, key.shape[1], heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(inner // heads)
    return (scores if bias is None else scores + bias.double()).softmax(dim=-1).mean(dim=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_at_least_float32(dtype):
    x = torch.ones(3, dtype=dtype)
    out = precision.at_least_float32(x)
    if dtype in (torch.float32, torch.float64):
        assert out is x  # no copy, no rounding: float32 and float64 results stay bit-identical
    else:
        assert out.dtype == torch.float32


@HALF
def test_adain_finite_and_close_in_half_precision(dtype):
    features = activations(2, TOKENS, 320, std=8, seed=0).to(dtype)
    style = activations(1, TOKENS, 320, std=6, seed=1).to(dtype)
    out = shared_attention.adain(features, style)
    assert out.dtype == dtype
    assert bool(out.isfinite().all())  # float16 before the fix: inf/NaN (sum of squares past 65504)
    assert relative_error(out, shared_attention.adain(features.double(), style.double())) < TOLERANCE[dtype]


def test_adain_float32_unchanged():
    features, style = activations(2, 300, 40, std=8, seed=2), activations(1, 300, 40, std=6, seed=3)

    def mean_std(x):  # the two-pass formula, in float32 as it always was
        mean = x.mean(dim=1, keepdim=True)
        return mean, ((x - mean).square().sum(dim=1, keepdim=True) / (x.shape[1] - 1) + 1e-5).sqrt()

    (mean, std), (style_mean, style_std) = mean_std(features), mean_std(style)
    expected = torch.addcmul(style_mean - mean * (style_std / std), features, style_std / std)
    assert torch.equal(shared_attention.adain(features, style), expected)
    assert relative_error(expected, shared_attention.adain(features.double(), style.double())) < 1e-6


@HALF
@pytest.mark.parametrize("shift", [0.0, math.log(2)])
def test_shared_attention_std_8_at_4096_positions(dtype, shift):
    """StyleAligned's layer end to end: finite, and as close to an exact AdaIN (rounded to the dtype,
    as any layer's inputs are) followed by exact attention as one rounding allows."""
    q, k, v = (activations(1, TOKENS, 64, std=8, seed=s).to(dtype) for s in (4, 5, 6))
    style = reference.ReferenceFeatures(*(activations(1, TOKENS, 64, std=8, seed=s).to(dtype) for s in (7, 8, 9)))
    out = shared_attention.SharedAttention(score_shift=shift)(q, k, v, style, 2, attention.scaled_dot_product_attention)
    assert out.dtype == dtype and bool(out.isfinite().all())
    exact = reference.ReferenceFeatures(*(t.double() for t in (style.query, style.key, style.value)))
    q64 = shared_attention.adain(q.double(), exact.query).to(dtype).double()
    k64 = shared_attention.adain(k.double(), exact.key).to(dtype).double()
    plain = shared_attention.SharedAttention(adain_queries=False, adain_keys=False, score_shift=shift)
    expected = plain(q64, k64, v.double(), exact, 2, attention.scaled_dot_product_attention)
    assert relative_error(out, expected) < TOLERANCE[dtype]


@HALF
def test_score_shift_keeps_float32_precision(dtype):
    """The score shift reaches the attention (and its recorded maps) as log 2 in float32, not rounded
    to the model's dtype: the maps are float32 and match float64 to float32's precision."""
    q, k, v = (activations(1, 256, 32, std=1, seed=s).to(dtype) for s in (10, 11, 12))
    style = reference.ReferenceFeatures(*(activations(1, 256, 32, std=1, seed=s).to(dtype) for s in (13, 14, 15)))
    maps = []

    def spy(query, key, value, heads, attn_precision=None, bias=None):
        maps.append(attention_maps.head_averaged_probabilities(query, key, heads, bias))
        return attention.scaled_dot_product_attention(query, key, value, heads, attn_precision, bias)

    method = shared_attention.SharedAttention(adain_queries=False, adain_keys=False, score_shift=math.log(2))
    method(q, k, v, style, 2, spy)
    bias = torch.cat([torch.zeros(256), torch.full((256,), math.log(2), dtype=torch.float64)])
    expected = exact_maps(q, torch.cat([k, style.key], dim=1), 2, bias)
    assert relative_error(maps[0], expected) < 3e-6  # float32's arithmetic; a float16 bias (0.6929): 1.5e-5


@HALF
def test_scaled_dot_product_attention_with_bias_in_half_precision(dtype):
    """Safe as it is: PyTorch's kernels keep the scores and the softmax's sums in float32."""
    q, k, v = (activations(1, TOKENS, 64, std=8, seed=s).to(dtype) for s in (16, 17, 18))
    bias = torch.zeros(TOKENS)
    bias[TOKENS // 2:] = math.log(2)
    out = attention.scaled_dot_product_attention(q, k, v, 2, bias=bias)
    assert out.dtype == dtype and bool(out.isfinite().all())
    expected = attention.scaled_dot_product_attention(q.double(), k.double(), v.double(), 2, bias=bias.double())
    assert relative_error(out, expected) < TOLERANCE[dtype]


@HALF
def test_attention_probabilities_in_half_precision(dtype):
    """Scores of magnitude ~60 (std 8 features): rounding them to float16 costs 3e-3 (bfloat16 3e-2)."""
    q = activations(2, TOKENS, 320, std=8, seed=19).to(dtype)
    k = activations(2, 77, 320, std=8, seed=20).to(dtype)
    out = attention_probe.attention_probabilities(q, k, 5)
    assert out.dtype == dtype
    assert relative_error(out.mean(dim=1), exact_maps(q, k, 5)) < TOLERANCE[dtype]


@HALF
def test_head_averaged_probabilities_are_float32(dtype):
    """Safe as it is: the capture upcasts before the scores, so its maps have float32's precision."""
    q = activations(2, TOKENS, 320, std=8, seed=21).to(dtype)
    k = activations(2, 77, 320, std=8, seed=22).to(dtype)
    out = attention_maps.head_averaged_probabilities(q, k, 5)
    assert out.dtype == torch.float32
    assert relative_error(out, exact_maps(q, k, 5)) < 1e-5  # float32 on scores ~100: 100 * 2^-24 ~ 6e-6


@HALF
def test_blend_maps_sum_in_float32(dtype):
    """Safe as it is: the local blend's running sum is float32 whatever the maps' dtype."""
    g = torch.Generator().manual_seed(23)
    maps = torch.rand(2, 8, TOKENS, 77, generator=g).softmax(dim=-1).to(dtype)
    words = torch.zeros(2, 77)
    words[:, 2:4] = 1
    blend = local_blend.BlendMaps(words)
    for _ in range(3):
        blend.add(maps, (64, 64))
    expected = 3 * (maps.double() * words.double()[:, None, None, :]).sum(-1).sum(1)
    assert blend.sum.dtype == torch.float32
    assert relative_error(blend.sum, expected) < 1e-6


@HALF
def test_colour_calibration_in_half_precision(dtype):
    g = torch.Generator().manual_seed(24)
    x0 = (torch.randn(2, 4, 128, 128, generator=g) * 30 + 5).to(dtype)
    style = (torch.randn(1, 4, 128, 128, generator=g) * 20 - 3).to(dtype)
    x0[1, 2] = 3.0  # a constant channel: float16 rounds EPSILON to 0, giving 0 / 0 before the fix
    out = color_calibration.channel_calibrated(x0, style)
    assert out.dtype == dtype and bool(out.isfinite().all())
    assert relative_error(out, color_calibration.channel_calibrated(x0.double(), style.double())) < TOLERANCE[dtype]


def test_colour_calibration_float32_unchanged():
    g = torch.Generator().manual_seed(25)
    x0, style = torch.randn(2, 4, 16, 16, generator=g) * 3, torch.randn(1, 4, 16, 16, generator=g) * 2
    dims = (-2, -1)
    expected = ((x0 - x0.mean(dims, keepdim=True)) / (x0.std(dims, keepdim=True) + 1e-8) * style.std(dims, keepdim=True)
                + style.mean(dims, keepdim=True))
    assert torch.equal(color_calibration.channel_calibrated(x0, style), expected)


def sd_sigmas(steps: int) -> torch.Tensor:
    """An ascending SD1.5 schedule from 0, as the inversion walks it."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas) / alphas).sqrt().float()
    return torch.cat([torch.zeros(1), sigmas[torch.linspace(0, 999, steps).round().long()]])


def input_scale(sigma):
    return 1 / (sigma ** 2 + 1).sqrt()


def toy_denoiser(seen: list):
    def denoise(x, sigma):
        seen.append(sigma)
        s = sigma.float().reshape(-1, 1, 1, 1)
        return (x.float() * 0.8 / (1 + s ** 2).sqrt() + 0.1 * torch.tanh(x.float())).to(x.dtype)
    return denoise


@HALF
def test_ddim_inversion_in_half_precision(dtype):
    """The walk in float32: the denoiser sees the schedule's sigmas exactly (float16 rounds 14.6146 to
    14.617), and the latents are the float32 walk's, rounded once."""
    sigmas = sd_sigmas(50)
    x = (torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(26)) * 4).to(dtype)
    seen = []
    trajectory = ddim.invert(toy_denoiser(seen), x, sigmas, input_scale)
    assert trajectory.latents.dtype == dtype
    assert all(s.dtype == torch.float32 for s in seen)
    assert torch.equal(torch.stack([s[0] for s in seen]), sigmas[1:])
    expected = ddim.invert(toy_denoiser([]), x.float(), sigmas, input_scale).latents
    assert max(relative_error(trajectory.latents[i], expected[i]) for i in range(1, 51)) < TOLERANCE[dtype]


def test_ddim_inversion_float32_unchanged():
    sigmas = sd_sigmas(10)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(27))
    denoise = toy_denoiser([])
    expected, latent = [x], x
    for i in range(10):
        labelled = latent * (input_scale(sigmas[i]) / input_scale(sigmas[i + 1]))
        eps = (labelled - denoise(labelled, sigmas[i + 1] * torch.ones(2))) / sigmas[i + 1]
        latent = latent + (sigmas[i + 1] - sigmas[i]) * eps
        expected.append(latent)
    assert torch.equal(ddim.invert(denoise, x, sigmas, input_scale).latents, torch.stack(expected))


def loss_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(28)
    x0, noise = torch.randn(4, 4, 64, 64, generator=g) * 4, torch.randn(4, 4, 64, 64, generator=g)
    sigma = torch.tensor([0.0292, 0.5, 3.0, 14.6])
    s = sigma.reshape(-1, 1, 1, 1)
    denoised = x0 + torch.randn(4, 4, 64, 64, generator=g) * 0.05 * s
    return [t.to(dtype) for t in (x0, noise, sigma, x0 + s * noise, denoised)]


@HALF
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_loss_in_half_precision(dtype, prediction):
    """The loss is float32; in float16 the raw output's recovery cancelled (v: 2.6e-2, eps: 6e-5)."""
    inputs = loss_inputs(dtype)
    loss = objective.prediction_loss(prediction, *inputs)
    exact = objective.prediction_loss(prediction, *(t.double() for t in inputs))
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(exact)) / float(exact) < 1e-5  # float32's arithmetic


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_loss_float32_unchanged(prediction):
    x0, noise, sigma, x_t, denoised = loss_inputs()
    s = sigma.reshape(-1, 1, 1, 1)
    if prediction == "eps":
        output, target = (x_t - denoised) / s, noise
    else:
        c = (1 + s ** 2).rsqrt()
        output, target = (x_t * c ** 2 - denoised) / (s * c), c * (noise - s * x0)
    expected = torch.nn.functional.mse_loss(output, target)
    assert torch.equal(objective.prediction_loss(prediction, x0, noise, sigma, x_t, denoised), expected)

