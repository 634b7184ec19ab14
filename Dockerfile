# dreamlab image. CPU by default:   docker build -t dreamlab .
# CUDA base by build arg:           docker build -t dreamlab:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 SDL_VIDEODRIVER=dummy MPLBACKEND=Agg
# Debian data packages (Fashion-MNIST, fortunes) plus what Box2D/pygame and video writing need; python3 for CUDA bases
RUN apt-get update && apt-get install -y --no-install-recommends \
        dataset-fashion-mnist fortunes make git ffmpeg libgl1 python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dreamlab
COPY . .
# The same install the README uses: a venv with torch 2.14.1 / torchvision 0.29.1 and every extra
RUN make install PY=python3 && ln -s /opt/dreamlab/.venv/bin/dreamlab /usr/local/bin/dreamlab
ENTRYPOINT ["dreamlab"]
CMD ["--help"]
