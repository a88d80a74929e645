# llmft on a CUDA machine: the same install steps as `make install`, with the CUDA build of torch.
#   docker build -t llmft .
#   docker run --gpus all --ipc=host -v /models:/models -v $PWD/data:/data llmft \
#       bash finetune/finetune_lora_single_gpu.sh -m /models/Qwen2.5-7B-Instruct -d /data/train.json
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python3-venv python3-dev git \
        openmpi-bin libopenmpi-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llmft
COPY requirements.txt requirements-dev.txt ./
# torch first, as the Makefile does (TORCH_PINS; on Linux that wheel is the CUDA 13 build); then the pinned set.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
 && /opt/venv/bin/pip install -r requirements.txt
ENV PATH=/opt/venv/bin:$PATH

COPY . .
# Last, llmft itself (editable, as `make install` does): the `llmft` command, and the package that tools/*.py import
# from any directory. Its build backend, setuptools, comes with torch.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation -e .
CMD ["bash", "finetune/finetune_lora_single_gpu.sh", "-h"]
