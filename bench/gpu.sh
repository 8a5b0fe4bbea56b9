#!/usr/bin/env bash
# One prepared GPU session: the GPU tests, then every benchmark, then a short summary.
# Usage: bash bench/gpu.sh [OUT_DIR]
# The whole script ends within GPU_SH_BUDGET seconds (default 570: under 10 minutes): each stage
# runs under its own time limit, cut to what the budget has left (the kernels stage leaves 200 s
# for the two after it), and a stage is skipped when nothing is left; every stage's log and
# table keep the rows it measured. The runs took 3.5-4 minutes on an H200 on 2026-11-27 and -28
# with two to ten candidates (ten: 3.5-4 minutes, every candidate timed).
# Needs torch + triton with CUDA. On a machine without network, soundfile is installed from
# ./.wheels (ignored by git), fetched beforehand for the GPU machine's Python, e.g. for 3.12:
#   pip download --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#       -d .wheels soundfile cffi pycparser
# A kernel change is judged against main's version in the same run (GPU timings drift between
# runs by more than most changes): every patch in bench/candidates/ (a one-file diff of kernels/
# waiting for a GPU, described at its top) is timed as a variant of the kernel table named after
# the patch. CANDIDATE="FILE [FILE ...]" times those files (kernel files, e.g. from
# `git show REV:kernels/gather_pad.py > gather_pad_old.py`, or patches) instead; CANDIDATE=""
# times none. Each candidate gives the kernels stage 25 s more; past two thirds of the stage's
# limit bench/kernels.py skips the candidates of the ops left, so main's rows always fit.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/out}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import soundfile" 2>/dev/null || \
  python3 -m pip install -q --no-index --no-deps --find-links .wheels soundfile cffi pycparser \
  >/dev/null 2>&1 || echo "note: soundfile unavailable; tokenizer tests will fail"
python3 - <<'PY' | tee "$out/env.txt"
import torch, triton
print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
      f"triton {triton.__version__}")
PY
budget=${GPU_SH_BUDGET:-570}
step() {  # step NAME TIMEOUT_S CMD...: run one stage, keep its log, never stop the script
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS - 10))  # 10 s kept for the summary
  (( left < limit )) && limit=$left
  if (( limit <= 0 )); then
    echo "=== $name: skipped (the ${budget} s budget is spent)"
    return
  fi
  echo "=== $name (at most $limit s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -n 60
  echo "=== $name: exit ${PIPESTATUS[0]}"
}
step gpu_tests 120 python3 -m pytest -q -p no:cacheprovider \
  tests/test_gather_pad.py tests/test_codebook_ce.py tests/test_sampling_kernels.py \
  tests/test_sampler.py -k "gpu or cuda"
[ -n "${CANDIDATE+set}" ] || CANDIDATE=$(ls bench/candidates/*.patch 2>/dev/null)
n_candidates=$(echo $CANDIDATE | wc -w)
limit=$((150 + 25 * n_candidates))
# 200 s stay for the sample and train stages: under their limits (140 + 150 s), which they reach
# only when the GPU is slow; the candidates come first, so a kernels stage that takes all of its
# limit cuts the train stage short (its table keeps the rows it measured)
keep=$((budget - SECONDS - 10 - 200))
(( keep < limit )) && limit=$keep
step kernels $limit python3 bench/kernels.py --out "$out/kernels.md" --time-limit $limit \
  ${CANDIDATE:+--candidate $CANDIDATE}
step sample 140 python3 bench/sample.py --out "$out/sample.md"
step train 150 python3 bench/train.py --out "$out/train.md"
echo "=== summary"
cat "$out"/env.txt "$out"/kernels.md "$out"/sample.md "$out"/train.md 2>/dev/null
