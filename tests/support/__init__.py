"""What several test files share beyond helpers.py (issue 27: test files never import one another).

parity.py          the diffusers-twin parity runs (twins, random prompts, the tolerance, sampling both sides)
inversion.py       tamed tiny models and Prompt Embedding Inversion runs
injection.py       Style Injection of a DDIM-inverted content and sampling from its inverted latent
reference_cache.py the style node's reference pass and its cache, as the tests inspect them
lora_fit.py        Fit Style LoRA's style image, its file and the model's raw output
"""
