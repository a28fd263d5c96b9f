"""StyleDiffusion's inversion inside ComfyUI (the loop itself is inversion/value_input.py).

Two runs in the guided-loop glue, each on a clone, so the input MODEL is never modified:
1. a plain DDIM inversion with the source prompt at cfg 1, the probed layers' cross-attention maps
   of every step kept (the regulariser's targets);
2. the value-input loop: the cond prediction through the trainee (its weights frozen, the step's
   scale and shift reaching every cross-attention layer's value input through ValueInputPatch),
   the uncond prediction computed once per step without gradient (a calc-cond-batch function:
   ComfyUI's own guidance, cfg functions included, combines them). What each step trains is either
   the (scale, shift) itself or, with a CLIP vision model, the authors' mapping network from the
   image's vision tokens (inversion/mapping_network.py).
Both runs compute in the training dtype (the frozen weights stay as ComfyUI loaded them, fp16, bf16
or fp8, cast per layer); the trained values stay float32; float16 trains with dynamic loss scaling.
"""

import dataclasses
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.samplers

from ..attention_patches.attention_probe import CrossAttentionProbe, MapSink
from ..attention_patches.feature_store import FeatureStore
from ..attention_patches.sigma_range import SigmaRange
from ..attention_patches.style_call import StyleOwner
from ..attention_patches.value_input import SITE, ValueInput, ValueInputPatch
from ..inversion.ddim import invert
from ..inversion.style_inversion import StyleInversion
from ..inversion.mapping_network import NetworkModulation, mapping_network
from ..inversion.value_input import DirectModulation, ValueInversionSettings, invert_value_inputs
from .architectures import adapter_for
from .guided_loop import run_guided_loop
from .lora_fit import TRAINING_DTYPES as LORA_TRAINING_DTYPES
from .lora_fit import computing_in, freeze_weights, prediction_of, resolve_dtype, with_size
from .site_patches import Claim, claim_sites, install_site_patches
from .style_call import install_style_call

EVERY_SIGMA = SigmaRange(float("inf"), -1.0)
# Fit Style LoRA's choices, and float16 (trained with dynamic loss scaling) for GPUs without bfloat16
TRAINING_DTYPES = {**LORA_TRAINING_DTYPES, "float16": torch.float16}


def training_dtype_of(name: str) -> torch.dtype:  # auto: bfloat16 on a GPU that has it, else float32
    if name not in TRAINING_DTYPES:
        raise ValueError(f"training_dtype must be one of {', '.join(TRAINING_DTYPES)}, not {name!r}")
    return TRAINING_DTYPES[name] or resolve_dtype("auto")


class MapBudgetError(ValueError):
    """The inversion's attention maps would pass max_megabytes."""


@dataclass
class TrainingValues:
    """The value input of the step being trained, for the trainee's StyleCall (a store answering any
    sigma with it)."""

    current: ValueInput | None = None

    def at(self, sigma, device, tag=None) -> dict:
        return {SITE: self.current}


@dataclass(frozen=True)
class SplitGuidance:
    """sampler_calc_cond_batch_function: the cond prediction with gradient, the uncond one without,
    computed once per latent and sigma (the inner iterations of a step share it)."""

    previous: object = None  # a calc-cond-batch function another node set, run for each half
    _last: dict = field(default_factory=dict, compare=False, repr=False)

    def _calc(self, args, conds):
        if self.previous is not None:
            return self.previous({**args, "conds": conds})
        return comfy.samplers.calc_cond_batch(args["model"], conds, args["input"], args["sigma"], args["model_options"])

    def __call__(self, args):
        cond, uncond = args["conds"]
        cond_out = self._calc(args, [cond, None])[0]
        if uncond is None:  # cfg 1: ComfyUI's own calc_cond_batch leaves a skipped cond's output zero
            return [cond_out, torch.zeros_like(cond_out)]
        x, sigma = args["input"], args["sigma"]
        key = (float(sigma[0]), x.data_ptr(), x._version, tuple(x.shape))
        if self._last.get("key") != key:
            with torch.no_grad():
                # [None, uncond]: ComfyUI labels each call's rows by their place in conds (1 = uncond)
                self._last.update(key=key, out=self._calc(args, [None, uncond])[1])
        return [cond_out, self._last["out"]]


INVERSION_CLAIM = Claim("PromptEmbeddingInversion", "model", "invert with the model before that node", takes_over=(),
                        foreign="{input_name}: the {what} of {names} is already replaced by another node "
                        "({patch_type}); the inversion needs those layers' attention maps: invert with the model "
                        "before that node")


def probed(model, layers, sink: MapSink):
    patched = model.clone()
    install_site_patches(patched, adapter_for(model, "PromptEmbeddingInversion"),
                         {layer: CrossAttentionProbe(layer, sink) for layer in layers}, "attn2", INVERSION_CLAIM)
    return patched


def check_free(model, layers) -> None:
    claim_sites(model, adapter_for(model, "PromptEmbeddingInversion"), layers, "attn2", INVERSION_CLAIM)


def model_input_scale(sampling):
    """sigma -> the model's c_in at sigma, a scalar tensor."""
    return lambda sigma: sampling.calculate_input(sigma.reshape(1), torch.ones(1, device=sigma.device)).reshape(())


def inversion_maps(model, positive, samples, sigmas, layers, max_bytes: int):
    """Plain DDIM inversion (cfg 1), each step's probed maps on the CPU: (trajectory, maps)."""
    sink = MapSink(armed=True)
    sampling = model.get_model_object("model_sampling")
    maps, used = [], [0]

    input_scale = model_input_scale(sampling)

    def loop(denoise, x, loop_sigmas, on_step):
        def keep(i, x_i, denoised):
            step_maps = {layer: m.detach().float().cpu() for layer, m in sink.take().items()}
            used[0] += sum(m.numel() * 4 for m in step_maps.values())
            if used[0] > max_bytes:
                raise MapBudgetError(
                    f"max_megabytes: the attention maps of {i + 1} of {len(loop_sigmas) - 1} steps already take "
                    f"{used[0] / 2**20:.0f} MB; raise max_megabytes or set attention_weight to 0")
            maps.append(step_maps)
            on_step(i, x_i, denoised)

        trajectory = invert(denoise, x, loop_sigmas, input_scale, keep)
        return trajectory.top, trajectory

    _, trajectory = run_guided_loop(probed(model, layers, sink), positive, positive, 1.0, sigmas, samples, loop)
    return trajectory, maps


def vision_tokens(clip_vision, image: torch.Tensor) -> torch.Tensor:
    """The image's CLIP vision tokens (1, tokens, width), every token after the final layer norm, as
    the authors' ln_post. ComfyUI's encode_image has no such output (a CLIP model norms only the class
    token, for image_embeds): a SigLIP model's last_hidden_state is normed already, a CLIP one's goes
    through the model's own post_layernorm here, any other encoder's is taken as it is."""
    output = clip_vision.encode_image(image)
    tokens = output["last_hidden_state"]
    vision = getattr(getattr(clip_vision, "model", None), "vision_model", None)
    norm = getattr(vision, "post_layernorm", None)
    if isinstance(norm, torch.nn.Module) and not getattr(vision, "output_layernorm", False):
        with torch.no_grad():
            tokens = norm(tokens)
    return tokens


def inversion_sigmas(model, scheduler: str, steps: int) -> torch.Tensor:
    """The ascending schedule (from 0); ddim_uniform may give a step more than asked."""
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).flip(0)


def prompt_embedding_inversion(model, positive, negative, samples: torch.Tensor, steps: int, scheduler: str,
                               guidance: float, layers, settings: ValueInversionSettings, source_prompt: str,
                               max_bytes: int = 4 << 30, on_iteration=None,
                               tokens: torch.Tensor | None = None,
                               training_dtype: str = "auto") -> tuple[torch.Tensor, StyleInversion]:
    """(the reconstruction's latent, VAE space; the STYLE_INVERSION). samples: the image's latent;
    tokens: the image's CLIP vision tokens (1, n, width) to train the mapping network from, or None to
    train each step's (scale, shift) directly; training_dtype: a TRAINING_DTYPES name."""
    prediction = prediction_of(model)  # eps or v on a discrete schedule: DDIM in sigma space holds
    check_free(model, layers)
    dtype = training_dtype_of(training_dtype)
    model = computing_in(model, dtype)
    settings = dataclasses.replace(settings, loss_scaling=dtype == torch.float16)
    sampling = model.get_model_object("model_sampling")
    height, width = samples.shape[-2] * 8, samples.shape[-1] * 8
    with torch.inference_mode(False):
        # made here, not in the engine's inference mode: autograd saves them (as the trajectory's sigmas)
        sigmas = inversion_sigmas(model, scheduler, steps).clone()
        positive, negative = with_size(positive, height, width), with_size(negative, height, width)
        probe_layers = layers if settings.attention_weight else []
        trajectory, maps = inversion_maps(model, positive, samples.clone(), sigmas, probe_layers, max_bytes)
        sink, values, owner = MapSink(), TrainingValues(), StyleOwner("PromptEmbeddingInversion", "trainee")
        trainee = probed(model, probe_layers, sink)
        freeze_weights(trainee)
        trainee.set_model_attn2_patch(ValueInputPatch(owner))
        install_style_call(trainee, owner, None, EVERY_SIGMA, recorded=values)
        trainee.set_model_sampler_calc_cond_batch_function(
            SplitGuidance(trainee.model_options.get("sampler_calc_cond_batch_function")))
        context = positive[0][0]
        if tokens is not None:
            tokens = tokens.detach().float().clone()  # out of inference mode: the network saves it for backward

        def initial(x):
            if tokens is None:
                return DirectModulation(torch.ones(context.shape[1:]).to(x), torch.zeros(context.shape[1:]).to(x))
            on_device = tokens.to(x.device)
            return NetworkModulation(mapping_network(on_device, *context.shape[1:]), on_device)

        def loop(denoise, x, loop_sigmas, on_step):
            def step(x_i, sigma, parameters):
                values.current = ValueInput(*parameters)
                sink.armed = True
                try:
                    denoised = denoise(x_i, sigma * x_i.new_ones(x_i.shape[0]))
                finally:
                    sink.armed = False
                return denoised, sink.take()

            def iteration_done(i, iteration, loss):
                comfy.model_management.throw_exception_if_processing_interrupted()
                if on_iteration is not None:
                    on_iteration(i, iteration, loss)

            # c_in = 1 / sqrt(1 + sigma^2): diffusers' latent is ComfyUI's scaled by it
            result = invert_value_inputs(step, trajectory.sigmas.to(x), trajectory.latents.to(x), maps,
                                         initial(x), model_input_scale(sampling), settings,
                                         iteration_done)
            return result.reconstruction, result

        top = model.get_model_object("latent_format").process_out(trajectory.top)
        reconstruction, result = run_guided_loop(trainee, positive, negative, guidance, sigmas.flip(0), top, loop)
    inversion = StyleInversion(
        trajectory, torch.stack([s.cpu() for s, _ in result.parameters]),
        torch.stack([s.cpu() for _, s in result.parameters]), source_prompt,
        {"steps": steps, "scheduler": scheduler, "guidance": guidance, "inner_iterations": settings.inner_iterations,
         "learning_rate": settings.learning_rate, "attention_weight": settings.attention_weight,
         "attention_target": settings.attention_target, "early_stop": settings.early_stop,
         "layers": [list(layer) for layer in probe_layers], "prediction": prediction,
         "mapping": "direct" if tokens is None else "clip_vision", "training_dtype": str(dtype).split(".")[-1]},
        tuple(tuple(l) for l in result.losses))
    return reconstruction, inversion


def learned_values_store(inversion: StyleInversion) -> FeatureStore:
    """The learned value input of each sampling step, keyed by the sigma the step starts at."""
    store = FeatureStore(max_bytes=1 << 62)
    for sigma, scale, shift in zip(inversion.sampling_sigmas()[:-1].tolist(), inversion.scales, inversion.shifts):
        store.put(sigma, {SITE: ValueInput(scale, shift)})
    return store


def with_learned_values(model, inversion: StyleInversion, owner: StyleOwner):
    """A clone whose cond rows take the learned value inputs at the inversion's sigmas (the source
    prompt's reconstruction at the inversion's cfg); another schedule is an error naming the sigma."""
    patched = model.clone()
    patched.set_model_attn2_patch(ValueInputPatch(owner))
    install_style_call(patched, owner, None, EVERY_SIGMA, recorded=learned_values_store(inversion))
    return patched
