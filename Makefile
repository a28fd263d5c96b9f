# `make test` and `make demo` provision everything they need (idempotent): a python3.11 venv with
# pinned torch and the test tools, and the ComfyUI hosts of scripts/hosts.py (0.3.75 and 0.8.0 under
# .comfyui/, each with a small venv of its own requirements layered on .venv), this pack linked into
# each. COMFYUI_DIR=/path/to/ComfyUI uses that ComfyUI alone.
PYTHON ?= python3.11
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python

TORCH_PINS := torch==2.14.1 torchvision==0.29.1
REQUIREMENTS := requirements.txt tests/requirements-comfyui.txt tests/requirements-test.txt

.PHONY: setup test demo bench gpu-check clean

CHROMIUM := /usr/bin/chromium

setup: $(VENV)/.installed $(CHROMIUM)
	$(PY) scripts/hosts.py setup

# Debian's Chromium for the browser test (Playwright cannot download browsers here). Without root
# the other tests still run and the browser test fails saying what is missing.
$(CHROMIUM):
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "WARNING: could not apt-get install chromium (root needed); tests/test_browser.py will fail"

$(VENV)/.installed: $(REQUIREMENTS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet $(TORCH_PINS) $(addprefix -r ,$(REQUIREMENTS))
	touch $@

# the whole suite on each host (scripts/hosts.py says which host runs the end-to-end tests)
test: $(VENV)/.installed $(CHROMIUM)
	$(PY) scripts/hosts.py test --durations=15

# demo and bench run on the newest host: ComfyUI 0.8.0 (0.3.75 without ../shared), or COMFYUI_DIR
demo: $(VENV)/.installed
	$(PY) scripts/hosts.py run scripts/demo.py

bench: $(VENV)/.installed
	$(PY) scripts/hosts.py run bench/run.py
	$(PY) scripts/hosts.py run bench/fit_lora.py
	$(PY) scripts/hosts.py run bench/injection.py
	$(PY) scripts/hosts.py run bench/masked_blend.py
	$(PY) scripts/hosts.py run bench/value_inversion.py
	$(PY) scripts/hosts.py run bench/prompt_to_prompt.py
	$(PY) scripts/hosts.py run bench/stylekeeper.py
	$(PY) scripts/hosts.py run bench/reference_sets.py
	$(PY) scripts/hosts.py run bench/flux.py
	$(PY) scripts/hosts.py run bench/sd3.py
	$(PY) scripts/hosts.py run bench/qwen_image.py
	$(PY) scripts/hosts.py run bench/lumina.py

# on a GPU machine (no internet needed once `make setup` has run): the precision matrix on CUDA and every
# bench/*.py --gpu, one report under gpu_report/ (scripts/gpu_check.py --help; ARGS="--dry-run" on a CPU)
gpu-check:
	test -x $(PY) || $(MAKE) setup
	$(PY) scripts/hosts.py run scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .comfyui output
