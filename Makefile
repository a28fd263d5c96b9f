# `make test` and `make demo` provision everything they need (idempotent): a python3.11 venv with
# pinned torch, ComfyUI 0.3.75 under .comfyui/ (or the one at COMFYUI_DIR), this pack linked into it.
PYTHON ?= python3.11
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
COMFYUI_DIR ?= $(CURDIR)/.comfyui/ComfyUI
export COMFYUI_DIR

TORCH_PINS := torch==2.14.1 torchvision==0.29.1
REQUIREMENTS := requirements.txt tests/requirements-comfyui.txt tests/requirements-test.txt

.PHONY: setup test demo bench clean

CHROMIUM := /usr/bin/chromium

setup: $(VENV)/.installed $(CHROMIUM)
	$(PY) scripts/install_comfyui.py "$(COMFYUI_DIR)"

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

test: setup
	$(PY) -m pytest

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .comfyui output
