#!/usr/bin/env bash
# The GPU paths in one go, for a machine with an NVIDIA GPU (CI has none, so no test covers them):
# bf16 autocast, fused AdamW, fp16 with a gradient scaler, torch.compile (and no "_orig_mod."
# in its checkpoint), resume on the GPU, DDP with NCCL under torchrun, the GPT-2 small preset,
# and every later stage on CUDA, ONNX Runtime parity included. About 5 minutes on one H200.
#
#   bash bench/gpu_check.sh [DATA]    # DATA holds 01_clean/ and 02_tokenize/ (default: data)
#
# Each check prints "ok ..." or "FAIL ..."; the exit status is the number of failures. DEVICE=cpu
# runs the same commands on a CPU (a dry run of this script, not a GPU check).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA=${1:-data}
DEV=${DEVICE:-cuda}
W=$(mktemp -d)
fails=0
check() {   # check NAME COMMAND...: run it, keep its output, say ok or FAIL
    local name=$1; shift
    if "$@" >"$W/$name.log" 2>&1; then echo "ok   $name"; else echo "FAIL $name (last lines below)"; tail -5 "$W/$name.log"; fails=$((fails + 1)); fi
}
fresh() {   # fresh DIR: a new data folder with the tokenizer and model config of the first run
    mkdir -p "$W/$1"; cp -r "$W/d/02_tokenize" "$W/d/03_model" "$W/$1/"
}
summary() { $PY -c "import json,sys; s=json.load(open('$1/04_train/summary.json')); print(s['$2'])"; }

$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU',
      '| bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
mkdir -p "$W/d"
cp -r "$DATA/01_clean" "$DATA/02_tokenize" "$W/d/"
check model_config $PY 03_model.py --data "$W/d"

# bf16 autocast + fused AdamW (04 picks both by itself on CUDA), then resume for 100 more steps
check train_bf16 $PY 04_train.py --data "$W/d" --device $DEV --max-steps 200 --eval-interval 100
[ "$DEV" = cuda ] && { [ "$(summary "$W/d" dtype)" = bf16 ] && echo "ok   dtype auto = bf16" || { echo "FAIL dtype auto is $(summary "$W/d" dtype)"; fails=$((fails + 1)); }; }
check fused_adamw $PY -c "
import importlib, torch
t = importlib.import_module('04_train'); m = importlib.import_module('03_model')
opt = t.make_optimizer(m.GPT(m.PRESETS['cpu']).to('$DEV'), 1e-3, 0.1, (0.9, 0.95), 1e-8, '$DEV')
assert opt.defaults['fused'] == ('$DEV' == 'cuda'), opt.defaults"
check resume_bf16 $PY 04_train.py --data "$W/d" --device $DEV --max-steps 300 --eval-interval 100 --resume
# fp16 with a gradient scaler (GPUs without bf16), and torch.compile
fresh f16; fresh cmp
check train_fp16 $PY 04_train.py --data "$W/f16" --device $DEV --dtype fp16 --max-steps 100 --eval-interval 50
check train_compile $PY 04_train.py --data "$W/cmp" --device $DEV --compile --max-steps 100 --eval-interval 50
check no_orig_mod $PY -c "
import torch
for f in ('ckpt.pt', 'last.pt'):
    sd = torch.load('$W/cmp/04_train/' + f, map_location='cpu', weights_only=True)['model']
    assert not any(k.startswith('_orig_mod.') for k in sd), f"
# DDP with NCCL: one process per GPU; on a one-GPU machine, a single rank still runs the NCCL path
NGPU=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")
fresh ddp
check torchrun_nccl $PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU 04_train.py \
    --data "$W/ddp" --device $DEV --max-steps 100 --eval-interval 50
# GPT-2 small sizing (124M): a few steps, to see it fits and runs
fresh g2   # --preset replaces its model config
[ "$DEV" = cuda ] && check gpt2_preset $PY 04_train.py --data "$W/g2" --preset gpt2 --device $DEV --max-steps 20 --batch-size 16 --eval-interval 10
# the later stages on CUDA, on the bf16 model trained above
check eval $PY 05_eval.py --data "$W/d" --device $DEV
check finetune $PY 06_finetune_lora.py --data "$W/d" --device $DEV --steps 100
$PY 07_safety.py --data "$W/d" --device $DEV --guards 1 --guard-steps 100 >"$W/safety.log" 2>&1
rc=$?   # 0 or 1 (the gate's verdict on a 300-step model) both mean it ran
if [ $rc -le 1 ]; then echo "ok   safety (exit $rc)"; else echo "FAIL safety"; tail -5 "$W/safety.log"; fails=$((fails + 1)); fi
check export_parity $PY 08_export.py --data "$W/d" --device $DEV
grep -h "tokens/s\|MFU\|bits per byte" "$W"/train_*.log "$W"/gpt2_preset.log 2>/dev/null
echo "$fails failure(s); logs in $W"
exit $fails
