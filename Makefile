# Set-up, tests and the offline demo. Everything installs into .venv from the repo's own pins.
#   make demo   tiny model -> fine-tune -> merge -> quantize -> chat, offline, on CPU
#   make test   the test suite (CPU; slow tests included); as root it first installs Open MPI and Slurm from apt

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

.PHONY: install system-deps demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# The launcher tests under mpirun and Slurm need both installed, and a cluster running: as root (CI) they come from
# apt and a two-node cluster starts on this machine. Elsewhere nothing is installed and those tests skip themselves;
# a cluster that will not start is only a warning for the same reason (its logs are printed).
system-deps:
	tools/install_system_deps.sh
	@if [ "$$(id -u)" -eq 0 ] && PATH="$$PATH:/usr/sbin" command -v slurmctld > /dev/null; then \
		tests/slurm_localhost.sh start || echo "warning: no Slurm cluster; its tests will be skipped" >&2; \
	fi

test: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: install
	rm -rf $(DEMO)
	$(PY) tools/make_tiny_model.py $(DEMO)/tiny-model
	$(PY) finetune.py examples/demo_lora.yaml --model_name_or_path $(DEMO)/tiny-model --output_dir $(DEMO)/lora
	$(PY) tools/merge_lora.py --adapter $(DEMO)/lora --output $(DEMO)/merged --data_path examples/conversations.json
	$(PY) tools/run_gptq.py --model_name_or_path $(DEMO)/merged --data_path examples/conversations.json \
		--out_path $(DEMO)/merged-gptq --bits 4 --num_samples 20 --eval_samples 6
	@for model in lora merged merged-gptq; do \
		printf '%-12s > Who are you?\n%-12s < ' $$model ''; \
		$(PY) tools/chat.py --model $(DEMO)/$$model --temperature 0 --max_new_tokens 32 --prompt "Who are you?" 2>/dev/null; \
	done

clean:
	rm -rf build
