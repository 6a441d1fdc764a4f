#!/usr/bin/env bash
# GPU check (issue 17), one short prepared run on a machine with one CUDA GPU:
#   kernels  the Triton kernel tests compiled on the GPU (tests/test_triton_kernels.py with
#            SGDET_TEST_DEVICE=cuda: every kernel case through the torch op, and a deployed
#            model on the Triton kernel, eager and torch.compiled, against the masked model)
#   bench    benchmarks/deploy_speed.py --device cuda at a reduced size: ResNet50 Conv-80,
#            float16, batch 64, dense and fast each eager and torch.compiled (the issue's aim)
#   train    once each, tiny runs on generated data: the classification trainer with AMP and
#            channels_last; classification compress under torchrun (world size 1, nccl); the
#            detection trainer (tools/train_net.py --num-gpus 1 under torchrun: nccl) with AMP
# Usage: benchmarks/gpu_check.sh [kernels] [bench] [train]   (no argument: all three, ~10 min;
#        each step has its own time limit). GPU_CHECK_DEVICE=cpu runs the same commands on the CPU
#        (kernels in Triton's interpreter, gloo, no AMP): a check of the script, not of the GPU.
# Results and logs go to $OUT (default out/gpu_check); summary.txt says which steps passed.
# Needs .venv (carried, or built here by `make setup`). Exit status: the number of failed steps.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK="$OUT/work"
PY="$ROOT/.venv/bin/python"
STAGES=${*:-kernels bench train}
DEV=${GPU_CHECK_DEVICE:-cuda}     # cpu: a dry run of the kernels and train steps (interpreter, gloo, no AMP)
BACKEND=$([ "$DEV" = cuda ] && echo nccl || echo gloo)
KERNEL_DEVICE=$([ "$DEV" = cuda ] && echo cuda || echo cpu)
export ROOT OUT WORK PY DEV BACKEND
failed=0

if [ ! -x "$PY" ]; then
  make setup >"$OUT/setup.log" 2>&1 || { echo "make setup failed (see $OUT/setup.log)"; exit 1; }
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

step() {   # step NAME SECONDS COMMAND...: run with a time limit (functions through bash), log to $OUT/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  if [ "$(type -t "$1")" = function ]; then
    timeout --kill-after=20 "$limit" bash -c "$*" >"$OUT/$name.log" 2>&1
  else
    timeout --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
  fi
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "ok      $name  $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
  else
    echo "FAILED  $name  rc=$rc  $(( $(date +%s) - start ))s  (log: $OUT/$name.log)" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.log"
    failed=$((failed + 1))
  fi
}

# --- the training steps (functions, so `timeout` can run them through bash) -------------------
amp_scaler_saved() {   # AMP on leaves the GradScaler state in the run's last checkpoint
  [ "$DEV" = cuda ] || return 0            # a CPU dry run: AMP applies on CUDA only
  "$PY" -c "import torch, sys; s = torch.load(sys.argv[1], weights_only=True)['train_state']
assert s.get('scaler'), 'no AMP scaler state: AMP was off'; print('AMP scaler state saved')" "$1/last_checkpoint.pt"
}
cls_amp_channels_last() {   # AMP + channels_last in the classification trainer (one process)
  "$PY" -m classification train --config "$WORK/tiny.yaml" DEVICE "$DEV" && amp_scaler_saved "$WORK/cls_train"
}
cls_torchrun() {   # compress under torchrun, world size 1: nccl on CUDA (DDP, rank-0 writes)
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m classification compress \
    --config "$WORK/tiny.yaml" DEVICE "$DEV" MODEL.WEIGHTS "$WORK/cls_train/model_final.sg.pt" \
    OUTPUT_DIR "$WORK/cls_torchrun" && grep "distributed: 1 processes ($BACKEND)" "$WORK/cls_torchrun/log.txt"
}
det_amp_torchrun() {   # the detection trainer with AMP, --num-gpus 1 under torchrun (nccl on CUDA)
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 tools/train_net.py \
    --config-file configs/faster_rcnn_sg_r50.yaml --num-gpus 1 DATASETS.ROOT "$WORK" \
    DATASETS.REGISTER '[["g_train","shapes/train/instances.json","shapes/train/images"],["g_val","shapes/val/instances.json","shapes/val/images"]]' \
    DATASETS.TRAIN '["g_train"]' DATASETS.TEST '["g_val"]' MODEL.ROI_HEADS.NUM_CLASSES 3 \
    MODEL.DEVICE "$DEV" MODEL.WEIGHTS "$WORK/r50_c60.sg.pt" SOLVER.AMP True \
    MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 16 MODEL.RPN.POST_NMS_TOPK_TRAIN 50 MODEL.RPN.POST_NMS_TOPK_TEST 20 \
    INPUT.MIN_SIZE_TRAIN '[128]' INPUT.MAX_SIZE_TRAIN 128 INPUT.MIN_SIZE_TEST '[128]' INPUT.MAX_SIZE_TEST 128 \
    SOLVER.IMS_PER_BATCH 2 SOLVER.EPOCHS 1 SOLVER.WARMUP_ITERS 1 SOLVER.DECAY_EPOCHS '[1]' \
    DATALOADER.NUM_WORKERS 2 OUTPUT_DIR "$WORK/det" \
    && grep "distributed: 1 processes ($BACKEND)" "$WORK/det/log.txt" && amp_scaler_saved "$WORK/det"
}
export -f amp_scaler_saved cls_amp_channels_last cls_torchrun det_amp_torchrun

{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
: >"$OUT/summary.txt"

case " $STAGES " in *" kernels "*)
  step kernels 240 env SGDET_TEST_DEVICE="$KERNEL_DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_triton_kernels.py --junitxml="$OUT/kernels.xml"
esac

case " $STAGES " in *" bench "*)
  step bench 330 "$PY" benchmarks/deploy_speed.py --device "$DEV" --protocol gpu --archs resnet50 --ratios 0.8 \
    --batches 64 --dtypes float16 --repeats 20 --warmup 5 --calib-repeats 3 --no-exact --no-onnx \
    --label "gpu_check" --out "$OUT/deploy_speed_cuda"
esac

case " $STAGES " in *" train "*)
  mkdir -p "$WORK"
  step train_data 120 "$PY" - "$WORK" <<'EOF'
# generated data: a 4-class image folder (32 px) and COCO shapes (128 px), a compressed ResNet50
import os, sys
import numpy as np
import torch
from PIL import Image
import sgdet
from sgdet.detection.shapes import make_shapes_dataset
work = sys.argv[1]
rng = np.random.default_rng(0)
for split, n in (("train", 16), ("val", 8)):
    for c in range(4):
        folder = os.path.join(work, "images", split, f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 80, (32, 32, 3)).astype(np.uint8)
            img[:, :, c % 3] += 40 * (c + 1)
            Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
with open(os.path.join(work, "tiny.yaml"), "w") as f:
    f.write(f"""_BASE_: {os.getcwd()}/configs/classification/Base-Classification.yaml
OUTPUT_DIR: {work}/cls_train
DEVICE: cuda
AMP: True
CHANNELS_LAST: True
MODEL: {{ARCH: resnet18, NUM_CLASSES: 4, INPUT_SIZE: [3, 32, 32]}}
DATA: {{NAME: imagefolder, ROOT: {work}/images, BATCH_SIZE: 8, TEST_BATCH_SIZE: 8, WORKERS: 2}}
SOLVER: {{EPOCHS: 1, LR: 0.05, SCHEDULE: cosine}}
SG: {{SCHEME: G, GROUPS: 4, STEP: 0.5, CONV_RATIO: 0.5, FC_RATIO: 0.5, LOCAL_EPOCHS: 1, LOCAL_LR: 0.01}}
""")
make_shapes_dataset(os.path.join(work, "shapes", "train"), 6, 128, seed=0)
make_shapes_dataset(os.path.join(work, "shapes", "val"), 3, 128, seed=1)
torch.manual_seed(0)
model = sgdet.build("resnet50")
sgdet.compress(model, conv_ratio=0.6, fc_ratio=0.6, groups=4, step=None, seed=0)
sgdet.save(model, os.path.join(work, "r50_c60.sg.pt"), meta={"label": "SG-ResNet50 (Conv-60/FC-60)"})
EOF

  step cls_amp_channels_last 150 cls_amp_channels_last
  step cls_torchrun 180 cls_torchrun
  step det_amp_torchrun 240 det_amp_torchrun
esac

echo "failed steps: $failed" | tee -a "$OUT/summary.txt"
exit "$failed"
