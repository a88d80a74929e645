# Set-up, tests and the offline demo. Everything installs into .venv from the repo's own pins.
#   make demo       tiny model -> fine-tune -> merge -> quantize -> chat, offline, on CPU
#   make test       the fast tier: every test not marked slow (CPU, minutes); `gpu` tests skip without CUDA
#   make test-all   every test, the slow ones too (several processes, GPTQ, end-to-end runs, install); CI runs it
#   make lint       ruff: the layout (`ruff format --check`) and the checks (ruff.toml); `pre-commit install`
#                   runs the same ruff on each commit's files (.pre-commit-config.yaml, requirements-dev.txt's ruff)
#   make system-deps   Open MPI and a local Slurm cluster for the mpirun/sbatch tests (root, apt; .ci/run calls it)
#   make gguf-deps     llama.cpp's converter, quantizer and runtime for `llmft export --format gguf` (a C++ build)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch stays a range in requirements.txt; on these CPU machines pin the build that also has a torchvision
# (GPTQModel imports it).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO ?= build/demo
PYTEST_ARGS ?=

# Nothing is downloaded at run time; GPTQModel uses two CPU workers on small machines.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export GPTQMODEL_CPU_WORKERS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: install system-deps gguf-deps demo test test-all lint clean

install: $(VENV)/.installed

# Last, llmft itself (editable): the package finetune.py and tools/*.py import. Its build backend, setuptools, is a
# torch requirement, so it is built with what is installed.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Open MPI and a two-node Slurm cluster on this machine, for the launcher tests under mpirun and sbatch. It installs
# apt packages (as root) and rewrites /etc/slurm/slurm.conf, so no test target runs it (the tests of those skip
# themselves without them); .ci/run asks for it, and then it fails when either is missing afterwards or the cluster
# does not start, and `make test-all` turns those skips into failures (LLMFT_REQUIRE_SYSTEM_TESTS=1).
system-deps:
	tools/install_system_deps.sh
	@command -v mpirun > /dev/null || { echo "error: no mpirun after tools/install_system_deps.sh" >&2; exit 1; }
	PATH="$$PATH:/usr/sbin" tests/slurm_localhost.sh start

# llama.cpp for `llmft export --format gguf`, into $(VENV): llama-cpp-python built from its pinned source release
# (requirements-gguf.txt; PyPI has no Linux wheel of it), then, from the same release, llama.cpp's converter
# (convert_hf_to_gguf.py with its conversion package) and the gguf-py it is written against, so converter, quantizer
# and runtime are one llama.cpp version. Opt-in: the build takes minutes (README, Export). Only the library is built
# (no tools, tests, server or multimodal library).
GGUF_BUILD ?= build/gguf-deps
GGUF_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF
gguf-deps: $(VENV)/.gguf-installed

$(VENV)/.gguf-installed: $(VENV)/.installed requirements-gguf.txt
	rm -rf $(GGUF_BUILD) && mkdir -p $(GGUF_BUILD)
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(GGUF_BUILD) \
		$$(grep -E '^llama-cpp-python==' requirements-gguf.txt)
	tar -xzf $(GGUF_BUILD)/llama_cpp_python-*.tar.gz -C $(GGUF_BUILD)
	CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -q --no-deps $(GGUF_BUILD)/llama_cpp_python-*.tar.gz
	$(PY) -m pip install -q --no-deps --force-reinstall $(GGUF_BUILD)/llama_cpp_python-*/vendor/llama.cpp/gguf-py \
		$(GGUF_BUILD)/llama_cpp_python-*/vendor/llama.cpp
	$(PY) -m pip install -q -r requirements-gguf.txt
	$(PY) -c "import llama_cpp, convert_hf_to_gguf, conversion, gguf"
	touch $@

# The tests marked slow (pyproject.toml) start several processes, quantize with GPTQ, train end to end in a
# subprocess or install the package; the rest is the tier to run while working.
test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

# layout, pycodestyle, pyflakes and annotations at 120 columns (ruff.toml); CI runs it before the tests.
# `ruff format .` writes the layout it checks.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

demo: install
	rm -rf $(DEMO)
	$(VENV)/bin/llmft make-tiny-model $(DEMO)/tiny-model
	$(VENV)/bin/llmft train examples/demo_lora.yaml --model_name_or_path $(DEMO)/tiny-model --output_dir $(DEMO)/lora
	$(VENV)/bin/llmft merge --adapter $(DEMO)/lora --output_dir $(DEMO)/merged --data_path examples/conversations.json
	$(VENV)/bin/llmft quantize --model_name_or_path $(DEMO)/merged --data_path examples/conversations.json \
		--output_dir $(DEMO)/merged-gptq --bits 4 --num_samples 20 --eval_samples 6
	@for model in lora merged merged-gptq; do \
		printf '%-12s > Who are you?\n%-12s < ' $$model ''; \
		$(VENV)/bin/llmft chat --model_name_or_path $(DEMO)/$$model --temperature 0 --max_new_tokens 32 \
			--prompt "Who are you?" 2>/dev/null; \
	done

clean:
	rm -rf build
