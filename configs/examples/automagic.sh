#!/usr/bin/env bash
# Automagic_Sinkgd: per-element learning-rate mask between MIN_LR and MAX_LR, SinkGD direction.
# Run from the repository root:  STEPS=2000 WARMUP=500 bash configs/examples/automagic.sh
# OPTIMIZER=Automagic_CameAMP selects the CAME-based sibling, whose max_lr default (1e-3) MAX_LR then follows.
set -euo pipefail

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-builtin:tiny-sd}
DATASET=${DATASET:-configs/examples/demo.toml}
STEPS=${STEPS:-200}
OUT=${OUT:-out/automagic}
NAME=${NAME:-automagic}
OPTIMIZER=${OPTIMIZER:-Automagic_Sinkgd}
LR=${LR:-1e-5}                         # starting value of every element of the lr mask
MIN_LR=${MIN_LR:-1e-6}
if [ "$OPTIMIZER" = Automagic_CameAMP ]; then MAX_LR=${MAX_LR:-1e-3}; else MAX_LR=${MAX_LR:-1e-2}; fi
WARMUP=${WARMUP:-50}                   # decay in the first half, OrthoGrad (if on) after it
DIM=${DIM:-16}
ALPHA=${ALPHA:-16}

"$PYTHON" train_network.py \
  --pretrained_model_name_or_path "$MODEL" \
  --dataset_config "$DATASET" \
  --output_dir "$OUT" \
  --output_name "$NAME" \
  --network_module networks.lora \
  --network_dim "$DIM" \
  --network_alpha "$ALPHA" \
  --optimizer_type "$OPTIMIZER" \
  --learning_rate "$LR" \
  --min_lr "$MIN_LR" \
  --max_lr "$MAX_LR" \
  --lr_bump 1e-5 \
  --warmup_steps "$WARMUP" \
  --weight_decay 5e-4 \
  --lr_scheduler constant \
  --max_train_steps "$STEPS" \
  --save_every_n_epochs 5 \
  --save_state \
  "$@"
