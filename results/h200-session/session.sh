#!/bin/bash
# One GPU lease: the fast preset in both frameworks, the side-by-side benchmark, the seed preset for one
# epoch in both, and the parity checks with JAX on the GPU. Every stage gets what is left of one deadline
# minus what the later stages need, so a slow stage shortens the rest instead of losing them.
set -u
BUDGET=${BUDGET:-560}
DEADLINE=$(( $(date +%s) + BUDGET ))
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD CIFAR10_PATH=/tmp/cifar10-jpeg EXPERT_CNN_CACHE=/tmp/expert_cnn_cache
export EXPERT_CNN_GIT_COMMIT=$(cat .gpu/commit)
R=runs/gpu
mkdir -p $R
stage() {  # stage NAME RESERVE CMD...: CMD gets the seconds left minus RESERVE
  local name=$1 reserve=$2; shift 2
  local limit=$(( DEADLINE - $(date +%s) - reserve )) start=$(date +%s)
  if (( limit < 20 )); then echo "$name: skipped, $limit s left" | tee -a $R/stages.txt; return; fi
  timeout --signal=INT --kill-after=10 $limit "$@" > $R/$name.log 2>&1
  echo "$name: rc $? in $(( $(date +%s) - start )) s (limit $limit s)" | tee -a $R/stages.txt
}
{ nvidia-smi; nproc; lscpu | grep 'Model name'; python3 -c "import jax, flax, optax, torch, numpy, PIL
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__,
      'numpy', numpy.__version__, 'pillow', PIL.__version__); print(jax.devices())"; } > $R/env.txt 2>&1
python3 .gpu/unpack.py .gpu/cifar10-jpeg.npz /tmp/cifar10-jpeg
stage data 500 python3 -c "from data import load_cifar10; print(load_cifar10().source)"
stage flax-fast 330 python3 scripts/train_flax.py --preset fast --out $R/flax-fast
stage torch-fast 120 python3 scripts/train_torch.py --preset fast --out $R/torch-fast
stage benchmark 55 python3 scripts/benchmark.py --device cuda --presets seed fast --merges auto --processes 1 \
  --repeats 20 --json $R/benchmark.json
stage flax-seed-1epoch 35 python3 scripts/train_flax.py --preset seed --epochs 1 --out $R/flax-seed-1epoch
stage torch-seed-1epoch 18 python3 scripts/train_torch.py --preset seed --epochs 1 --out $R/torch-seed-1epoch
stage parity 6 python3 scripts/check_parity.py --images 500 --steps 10 --json $R/parity.json
tar czf $OUT/gpu-runs.tar.gz --exclude='*.ckpt' --exclude='*fast/weights.safetensors' $R
[ -f $R/flax-fast/weights.safetensors ] && split -b 16000000 $R/flax-fast/weights.safetensors $OUT/flax-fast-weights.part-
cp $R/stages.txt $R/env.txt $OUT/ 2>/dev/null
grep -h "epoch \|done:" $R/flax-fast.log $R/torch-fast.log | tail -12
grep -h "img/s\|ratio" $R/benchmark.log
cat $R/stages.txt; ls -la $OUT
