#!/bin/bash
# The GPU machine's side of the everyday CLIP's GPU stage (GPU_STAGE in training/embedded/recipes.py), for a session lent
# one (this workplace's `device` tool: a copy of the working tree plus carried ignored paths, at most 64 MiB a call,
# a machine that stays warm for 30 s between calls, no network, its own python3 with torch but no open_clip).
#
# Prepared here, under .gpu/ (ignored):
#   python -m training.embedded.everyday --write-pack .gpu/pack --train-dir data/imagenet-photos/train   # 161 MB, 8 parts
#   gzip -9 -k .gpu/pack/index.json
#   python -m training.embedded.pack .gpu/pack .gpu/smoke --per-source 400
#   cp runs/<last CPU stage>/weights.safetensors .gpu/init.safetensors
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu/wheels open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# The tracked checkpoints and reports (about 51 MB) must stay behind for the parts to fit: `git rm -r --cached
# lraee_core/assets/{everyday,photos,world} reports` (lraee_core/assets/model_configs stays: the trainer reads the
# architecture there) and list them in .git/info/exclude for the calls, then `git reset` and restore the exclude file.
# The three calls must follow each other within the 30 s the machine stays warm, or the staged parts are gone.
# As run on 2026-11-30 (stage everyday_clip_gpu): smoke 19.4 steps/s at batch 1024 (the GPU's load was not
# measured), all three calls and a salvage in 730 s of device time; the stage predates the deadline and was cut.
#
# Calls (each copies the pack parts it carried to /tmp/pack, which stays while the machine is warm):
#   1. bash training/embedded/device_stage.sh smoke 40   carry .gpu/wheels .gpu/smoke .gpu/init.safetensors parts 0-1
#      (checks the environment; prints steps/s at the stage's batch, which call 3 reads from /tmp/smoke)
#   2. bash training/embedded/device_stage.sh            carry parts 2-4
#   3. bash training/embedded/device_stage.sh stage S [N] carry parts 5-7 and index.json.gz; S: the seconds the call may
#      take (550 of the tool's 600), N: the steps (default: what the smoke run's rate fits into 90% of S less 150 s;
#      record them in GPU_STAGE afterwards). STAGE names the stage (default everyday_clip_gpu2, GPU_STAGE).
#      ($OUT gets weights.safetensors, training_log.json, holdout.csv and eval_split.json: copy them into
#      runs/<stage>/, add the stage to EVERYDAY_STAGES, then `python -m training.embedded.recipes everyday`)
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.." || exit 1
if [ ! -d /tmp/site/open_clip ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site
mkdir -p /tmp/pack /tmp/keep
for f in .gpu/pack/part-*.bin; do [ -f "$f" ] && cp "$f" /tmp/pack/; done
[ -f .gpu/pack/index.json.gz ] && gunzip -c .gpu/pack/index.json.gz > /tmp/pack/index.json
[ -f .gpu/init.safetensors ] && cp .gpu/init.safetensors /tmp/keep/
ls -la /tmp/pack /tmp/keep
case "${1:-}" in
  smoke)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    python3 -c "import torch, torchvision, open_clip, timm
print(torch.__version__, torchvision.__version__, open_clip.__version__, timm.__version__, torch.cuda.is_available())" \
      || exit 1
    python3 -m training.embedded.everyday --pack-dir .gpu/smoke --output-dir /tmp/smoke \
      --init-weights /tmp/keep/init.safetensors --steps 100000 --batch-size 1024 --lr 6e-4 --warmup-steps 300 \
      --device "${DEVICE:-cuda}" --cuda-bf16 --batched-augment --prefetch 4 --log-every 10 \
      --checkpoint-every 100000 --threads "${THREADS:-16}" --time-limit-s "${2:-40}" --no-progress || exit 1
    python3 -c "
import json
log = json.load(open('/tmp/smoke/training_log.json'))
history = log['history']
print('steps', log['steps'], 'training s', log['wall_time_s'])
for a, b in zip(history, history[1:]):
    print(b['step'], round(b['loss'], 3), round((b['step'] - a['step']) / (b['elapsed_s'] - a['elapsed_s']), 2),
          'steps/s, data share', b['data_fraction'])
"
    cp /tmp/smoke/training_log.json "$OUT/smoke_log.json"
    ;;
  stage)
    # $2: the seconds this call may take (under the tool's 600 s limit). Training ends by then less a margin for
    # writing the outputs (--deadline-unix: the decoding of the 102,657 photos, over a minute there, counts too).
    # The stage's length: $3 steps, else what the smoke run's steps per second (its log, left in /tmp/smoke while
    # the machine stayed warm) fit into 90% of $2 less STARTUP_S (150 s: the decoding and the model's start), in
    # whole hundreds; else GPU_STAGE's own.
    start=$(date +%s)
    budget="${2:-0}"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    steps="${3:-}"
    if [ -z "$steps" ] && [ -f /tmp/smoke/training_log.json ] && [ "$budget" != 0 ]; then
      steps=$(python3 -c "
import json
history = json.load(open('/tmp/smoke/training_log.json'))['history'][1:]  # the first entry holds CUDA's start
rate = (history[-1]['step'] - history[0]['step']) / (history[-1]['elapsed_s'] - history[0]['elapsed_s'])
print(int(rate * 0.9 * ($budget - ${STARTUP_S:-150})) // 100 * 100)")
    fi
    echo "stage steps: ${steps:-as GPU_STAGE}"
    deadline=0
    [ "$budget" != 0 ] && deadline=$((start + budget - 40))
    python3 -m training.embedded.recipes everyday-stage "${STAGE:-everyday_clip_gpu2}" --pack-dir /tmp/pack \
      --init-weights /tmp/keep/init.safetensors --runs-dir /tmp/runs --threads "${THREADS:-16}" \
      --deadline-unix "$deadline" ${steps:+--clip-steps "$steps"} 2>&1 | tee "$OUT/stage.log"
    status=${PIPESTATUS[0]}
    for f in weights.safetensors training_log.json holdout.csv eval_split.json; do
      [ -f "/tmp/runs/${STAGE:-everyday_clip_gpu2}/$f" ] && cp "/tmp/runs/${STAGE:-everyday_clip_gpu2}/$f" "$OUT/"
    done
    echo "stage took $(($(date +%s) - start)) s"
    exit "$status"
    ;;
  salvage)
    # A stage killed before it wrote its outputs (so it ended on 2026-11-30): its last state.pt's model as FP16
    # weights.safetensors (the tensors the trainer's own finish would save: tested), and the state's step, config
    # and history as state_meta.json, into $OUT. Here, with them in runs/<stage>/, its training log follows:
    #   python -m training.embedded.everyday --salvaged-log runs/<stage> --pack-dir .gpu/pack --ended "<why and where>"
    # (stop_step set to the state's step; the stage's entry in EVERYDAY_STAGES records it the same way).
    run="/tmp/runs/${STAGE:-everyday_clip_gpu2}"
    cp "$run/holdout.csv" "$run/eval_split.json" "$OUT/"
    python3 -c "
from pathlib import Path
from training.embedded.trainer import salvage_state
print('step', salvage_state(Path('$run/state.pt'), Path('$OUT')))
"
    ;;
  *) echo "parts staged in /tmp/pack" ;;
esac
