#!/usr/bin/env bash
# The checks of bench/README.md's "On a GPU" list in one command, for a short GPU lease: each step runs under its
# own time limit, and a step that no longer fits the whole run's budget is skipped, so the most valuable ones (first)
# are the ones that run. Everything goes to the console and to $OUT/gpu_checks.log (or /tmp/gpu_checks.log).
#
#   here, once:  python3 -m pip download --no-deps --only-binary=:all: -d .whl yacs    # .whl/ is ignored by git
#   on the GPU:  bash bench/gpu_checks.sh         (the device tool: carry [".whl"], timeout_s 580)
#
# A GPU machine's image may lack yacs, which this project needs; its pure-Python wheel travels in .whl/.
# GPU_CHECKS_SECONDS (default 540) is the budget, PYTHON the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/gpu_checks.log
: > "$log"
budget=${GPU_CHECKS_SECONDS:-540}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "$*" | tee -a "$log"; }

if ! "$py" -c "import yacs" 2>/dev/null; then
    if ! ls .whl/*.whl > /dev/null 2>&1; then
        say "yacs is not installed and no .whl/ folder came with the command: see the top of $0"
        exit 1
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# step NAME SECONDS COMMAND...: the command under min(SECONDS, what is left of the budget), or skipped.
step() {
    local name=$1 limit=$2 left=$((budget - SECONDS))
    shift 2
    if ((left < 20)); then
        say "=== $name: skipped, ${left} s of the budget left"
        return
    fi
    ((limit > left)) && limit=$left
    say "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    say "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$log"
"$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), 'cores', len(__import__('os').sched_getaffinity(0)))" 2>&1 | tee -a "$log"

step cuda-tests 120 "$py" -m pytest -q -p no:cacheprovider tests/test_transfer.py
step run-all 240 "$py" bench/run_all.py --gpu 0 --skip-ooc
step mae-compiled 180 "$py" bench/run_all.py --gpu 0 --only 2d_mae --steps 48 --set TRAIN.COMPILE=True
step mae-trainer 120 "$py" bench/profile_mae.py --gpu 0 --trainer
step plain-layout 120 "$py" bench/run_all.py --gpu 0 --only 2d_crappify 3d_crappify --set TRAIN.CHANNELS_LAST=False
step recompute 60 "$py" bench/bench_recompute.py --gpu 0 --rounds 3
res=$(mktemp -d)
step demo 90 "$py" main.py --config templates/self-supervised/2d_self-supervised.yaml --result_dir "$res" \
    --name demo --run_id 1 --gpu 0 TRAIN.EPOCHS 3
step fp16 90 "$py" main.py --config templates/self-supervised/2d_self-supervised.yaml --result_dir "$res" \
    --name fp16 --run_id 1 --gpu 0 TRAIN.EPOCHS 2 TRAIN.AMP fp16
step torchrun 90 "$py" -m torch.distributed.run --nproc_per_node=1 main.py \
    --config templates/self-supervised/2d_masking_mae.yaml --result_dir "$res" --name ddp --run_id 1 --gpu 0 TRAIN.EPOCHS 2
say "=== done after ${SECONDS} s"
