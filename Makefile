# Fresh machine: `make demo` (the CPU demo on a real small model) and `make test` (the test suite).
# Both set up whatever is missing first and are safe to re-run.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.tutor_wrap-installed
SMOL   := .cache/models/SmolLM2-135M-Instruct/READY.json

.PHONY: setup demo test test-fast clean-runs go-toolchain sandbox browser vulkan-build llamacpp

setup:
	@$(PARALLEL) $(STAMP) llamacpp

# torch first, pinned: the CPU wheel on these machines; a bare `torch` requirement could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -e '.[dev]'
	touch $@

# Always asked: the script checks its pinned sdist and every tool it must provide in well under a second, and
# builds only what is missing (a checkout from before a tool was added gets it).
llamacpp:
	@$(PYTHON) tools/build_llamacpp.py

$(SMOL): $(STAMP)
	$(VPY) tools/fetch_smollm2.py

# The setup steps that do not depend on each other run at the same time (a sub-make with -j: make 4.3 ignores -j
# set inside a makefile): the venv's installs are mostly downloads, the llama.cpp build is the CPU-bound part.
# Their lines interleave as they come (make's output sync would hold the 10-minute build's progress until it ends).
PARALLEL := $(MAKE) --no-print-directory -j3

demo:
	@$(PARALLEL) $(STAMP) llamacpp $(SMOL) sandbox
	$(VPY) -m tutor_wrap run recipes/demo.yml

# bubblewrap: the sandbox eval's code_runs runs model-written code in (answers/code_runs.py; Debian's bubblewrap).
sandbox:
	@command -v bwrap >/dev/null || { echo "installing bubblewrap (the sandbox for eval's code_runs)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq bubblewrap >/dev/null; fi; }

# Go renders Modelfile templates exactly as Ollama does, for the train/serve parity test (Debian's golang-go).
# After `sandbox`: two apt-gets at once would fight over apt's lock under make -j.
go-toolchain: sandbox
	@command -v go >/dev/null || { echo "installing Go (golang-go) for the template parity test"; \
	  apt-get update -qq && apt-get install -y -qq golang-go >/dev/null; }

# Chromium: the browser the HTML reports are loaded in by the tests (tests/browser.py, through Playwright; Debian's
# chromium). After go-toolchain: one apt-get at a time.
browser: go-toolchain
	@command -v chromium >/dev/null || { echo "installing Chromium (chromium) for the HTML reports' browser test"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

# llama.cpp built with its Vulkan backend, which tests/test_vulkan.py runs the GGUF half on with Mesa's lavapipe (a
# software Vulkan device): the GPU code path proven on a machine without a GPU. Only `make test` builds it (about
# 8 min on 2 cores, once; .cache/llama.cpp-vulkan). After browser: one apt-get at a time.
VULKAN_PKGS := mesa-vulkan-drivers libvulkan-dev glslc spirv-headers glslang-tools
vulkan-build: browser
	@dpkg -s $(VULKAN_PKGS) >/dev/null 2>&1 || { echo "installing the Vulkan build tools and Mesa's lavapipe"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(VULKAN_PKGS) >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $(VULKAN_PKGS) >/dev/null; fi; }
	@$(PYTHON) tools/build_llamacpp.py --backend vulkan --dest .cache/llama.cpp-vulkan

# olah, a self-hosted Hugging Face hub mirror that serves local git repositories through the hub's API: the real
# hub server the download tests talk to (tests/test_hub.py), in a venv of its own (its web stack apart from ours).
HUB_SERVER := .cache/olah/bin/olah-cli
$(HUB_SERVER):
	$(PYTHON) -m venv .cache/olah
	.cache/olah/bin/python -m pip install --quiet olah==0.5.4

# Everything (what CI runs), with the 25 slowest tests listed at the end.
test:
	@$(PARALLEL) $(STAMP) llamacpp go-toolchain sandbox browser vulkan-build $(HUB_SERVER)
	$(VPY) -m pytest -q --durations=25

# The development lane: unit + tools tests, no training (tests/conftest.py: LANES), on two workers (pytest-xdist),
# a module's tests on one worker: the sandbox tests count the sandbox user's processes, test_merge shares one merged
# model. Not --dist loadgroup: with pytest 9.2 its xdist_group marks are silently ignored (pytest-xdist#1386).
test-fast:
	@$(PARALLEL) $(STAMP) llamacpp go-toolchain sandbox browser $(HUB_SERVER)
	$(VPY) -m pytest -q -m "not e2e" -n 2 --dist loadfile --durations=10

clean-runs:
	rm -rf runs
