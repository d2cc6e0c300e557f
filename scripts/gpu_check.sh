#!/usr/bin/env bash
# shellcheck disable=SC2329  # the parts' functions run through bash -c, under timeout
# The GPU check in one command: versions, the CUDA tests, benchmarks/gpu.py within its budget, and
# a DDP (accumulation 2) and an FSDP (bf16) pre-training run under torchrun, each saved and then
# resumed. Every part has a timeout, a failing part does not stop the others, and the exit status
# is 0 only if every part passed.
#
#   scripts/gpu_check.sh --prepare   here, with a network: download into gpu-wheels/ the
#                                    pure-Python wheels the GPU machine lacks (jsonargparse with
#                                    its signatures extra), for Python 3.12
#   scripts/gpu_check.sh             on the GPU machine, from the repository root, gpu-wheels/
#                                    carried along: install them offline, run every part on NCCL
#   scripts/gpu_check.sh --smoke     every part on this CPU, tiny (gloo; CI runs it)
#
# Outputs go to $OUT (a new temporary folder when unset), three files: gpu_check.log (everything
# printed, the runs' summaries included), gpu_check.json (each part's status and seconds, rewritten
# after every part) and gpu.json (benchmarks/gpu.py's, rewritten after every row).
# Environment: PYTHON (default .venv/bin/python if present, else python3); ONLY, the parts to run
# (names as in gpu_check.json, space-separated; default all: a second call can rerun one); BUDGET, the benchmark's
# seconds of work (default 420; 60 with --smoke); TOTAL_S, the whole check's wall clock (default
# 540), which shortens the benchmark's budget when the parts before it ran long.
# droppos runs from src/ (PYTHONPATH), not installed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

MODE=gpu
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --smoke) MODE=smoke ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--prepare | --smoke]" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS=gpu-wheels
# droppos's dependencies that the GPU machine's image lacks: it holds torch, torchvision, timm,
# safetensors, numpy, pillow, pyyaml, tqdm, tensorboard, pytest and typing-extensions, but not
# jsonargparse[signatures], which needs these three (all pure Python).
MISSING=(jsonargparse docstring-parser typeshed-client)

if [ "$MODE" = prepare ]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"  # one version of each: two would stop the install
  for name in "${MISSING[@]}"; do
    # the version this environment runs (and the tests pass with), else the newest
    version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null)
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      -d "$WHEELS" "$name${version:+==$version}" || exit 1
  done
  ls "$WHEELS"
  echo "carry $WHEELS to the GPU machine and run scripts/gpu_check.sh there"
  exit 0
fi

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check.json
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE=$!
START=$SECONDS
TOTAL_S=${TOTAL_S:-540}
export PYTHON WORK MODE WHEELS PYTHONUNBUFFERED=1 PYTHONPATH=src
if [ "$MODE" = smoke ]; then
  BUDGET=${BUDGET:-60}
  DEVICE=cpu
  # what the CPU trains in a second: one 32-wide block on 64 small JPEGs in batches of 16 (the
  # demo's 4,000 images would take longer than starting torchrun)
  "$PYTHON" -c "
import sys
from pathlib import Path
from PIL import Image
root = Path(sys.argv[1])
root.mkdir()
for i in range(64):
    Image.effect_noise((32, 32), 64 + i).convert('RGB').save(root / f'{i}.jpg')
" "$WORK/images"
  TINY=(--data.source "$WORK/images" --model.encoder.img_size 16 --model.encoder.patch_size 4
        --model.encoder.in_chans 3 --model.encoder.embed_dim 32 --model.encoder.depth 1
        --model.encoder.num_heads 2 --model.decoder_embed_dim 32 --model.decoder_num_heads 2
        --optim.batch_size 16 --data.num_workers 0)
else
  BUDGET=${BUDGET:-420}
  DEVICE=cuda
  TINY=(--data.num_workers 2)  # the demo preset as it is: a ViT-Tiny, batches of 64
fi

DONE=()  # one JSON object per part
write_summary() {
  local passed=true
  for p in "${DONE[@]}"; do [[ $p == *'"status": "passed"'* ]] || passed=false; done
  local joined
  joined=$(IFS=,; echo "${DONE[*]}")
  printf '{"mode": "%s", "passed": %s, "seconds": %d, "parts": [%s]}\n' \
    "$MODE" "$passed" $((SECONDS - START)) "$joined" >"$SUMMARY"
}

# part NAME SECONDS COMMAND...: run COMMAND under a timeout, record how it went
part() {
  local name=$1 limit=$2 began=$SECONDS rc status
  shift 2
  if [ -n "${ONLY:-}" ] && [ "$name" != install ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  echo "=== $name (timeout ${limit}s) ==="
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=passed ;;
    124 | 137) status=timed_out ;;
    *) status=failed ;;
  esac
  echo "=== $name: $status in $((SECONDS - began)) s (exit $rc) ==="
  DONE+=("{\"name\": \"$name\", \"status\": \"$status\", \"exit\": $rc, \"seconds\": $((SECONDS - began))}")
  write_summary
}

install_wheels() {  # offline, into $WORK/site: the machine's own environment stays as it is
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in $WHEELS/: run scripts/gpu_check.sh --prepare where pip reaches PyPI," \
      "and carry $WHEELS"
    return 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    "${wheels[@]}"
}

versions() {
  "$PYTHON" - <<'EOF' || return 1
import platform

import torch

import droppos

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("torchvision", "timm", "numpy", "PIL"):
    print(name, __import__(name).__version__, end=" | ")
print("droppos", droppos.__version__)
import jsonargparse  # last: what gpu-wheels/ brings, and the command line that needs it
import droppos.cli.main

print("jsonargparse", jsonargparse.__version__)
EOF
  if [ "$MODE" = gpu ]; then nvidia-smi || true; fi
}

# train_and_resume NAME ARGS...: one epoch, then the same command extended to two epochs, which
# must continue from last.pth
train_and_resume() {
  local name=$1 dir=$WORK/$1 epochs
  shift
  set -o pipefail
  for epochs in 1 2; do
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m droppos.cli.main \
      pretrain --config tiny_cpu --run.output_dir "$dir" --optim.epochs "$epochs" \
      --run.tensorboard false --run.progress false --run.pictures_every 0 \
      --run.monitor_every -1 "$@" 2>&1 | tee "$WORK/$name.out" || return 1
  done
  cat "$dir/summary.json"
  grep -q "resuming at epoch 2" "$WORK/$name.out" || { echo "$name: did not resume"; return 1; }
  grep -q "epoch 2/2:" "$WORK/$name.out" || { echo "$name: no second epoch"; return 1; }
}
export -f install_wheels versions train_and_resume

echo "gpu_check ($MODE) with $PYTHON; outputs in $OUT"
if [ "$MODE" = gpu ] || [ -d "$WHEELS" ]; then
  part install 120 bash -c install_wheels
  if [ -d "$WORK/site" ]; then export PYTHONPATH=src:$WORK/site; fi
fi
part versions 120 bash -c versions
part cuda_tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests
part ddp_accum2 180 bash -c 'train_and_resume "$@"' _ ddp --run.strategy ddp \
  --run.device "$DEVICE" --optim.accum_steps 2 "${TINY[@]}"
part fsdp_bf16 180 bash -c 'train_and_resume "$@"' _ fsdp --run.strategy fsdp \
  --run.device "$DEVICE" --run.precision bf16 "${TINY[@]}"
# last, as it can use what is left: its budget shrinks to fit TOTAL_S, and its JSON is rewritten
# after every row, so a timeout still keeps what it measured
left=$((TOTAL_S - (SECONDS - START) - 60))
budget=$((BUDGET < left ? BUDGET : left))
budget=$((budget > 30 ? budget : 30))
smoke=()
if [ "$MODE" = smoke ]; then smoke=(--smoke); fi
part benchmark $((budget + 60)) "$PYTHON" benchmarks/gpu.py "${smoke[@]}" --budget-s "$budget" \
  --json "$OUT/gpu.json"

write_summary
cat "$SUMMARY"
grep -q '"passed": true' "$SUMMARY"
passed=$?
exec >&- 2>&-  # let tee write the log's last lines before the script returns
wait "$TEE" 2>/dev/null
exit $passed
