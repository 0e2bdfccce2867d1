#!/usr/bin/env bash
# Multi-GPU LoRA with accelerate (data parallel: every GPU takes its own batches; the effective batch is
# batch_size x NUM_PROCESSES). Run from the repository root:
#   NUM_PROCESSES=4 MODEL=/models/v1-5-pruned-emaonly.safetensors DATASET=my_dataset.toml \
#     bash configs/examples/accelerate_multi_gpu.sh
# On a CPU-only machine the same command runs NUM_PROCESSES processes joined through gloo (PRECISION=no there):
#   NUM_PROCESSES=2 PRECISION=no bash configs/examples/accelerate_multi_gpu.sh
# (accelerate's own --cpu flag would start a single process whatever NUM_PROCESSES says.)
set -euo pipefail

ACCELERATE=${ACCELERATE:-accelerate}
NUM_PROCESSES=${NUM_PROCESSES:-2}
ACCELERATE_ARGS=${ACCELERATE_ARGS:-}   # e.g. "--gpu_ids 0,1"
MODEL=${MODEL:-builtin:tiny-sd}
DATASET=${DATASET:-configs/examples/demo.toml}
STEPS=${STEPS:-200}
OUT=${OUT:-out/multi_gpu}
NAME=${NAME:-multi_gpu}
PRECISION=${PRECISION:-bf16}

# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
"$ACCELERATE" launch \
  --multi_gpu \
  --num_processes "$NUM_PROCESSES" \
  --num_machines 1 \
  --mixed_precision "$PRECISION" \
  --dynamo_backend no \
  $ACCELERATE_ARGS \
  train_network.py \
  --pretrained_model_name_or_path "$MODEL" \
  --dataset_config "$DATASET" \
  --output_dir "$OUT" \
  --output_name "$NAME" \
  --network_module networks.lora \
  --network_dim 16 \
  --network_alpha 8 \
  --optimizer_type AdamW \
  --learning_rate 1e-4 \
  --max_train_steps "$STEPS" \
  --mixed_precision "$PRECISION" \
  --save_every_n_epochs 5 \
  --save_state \
  "$@"
