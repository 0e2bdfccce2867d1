#!/usr/bin/env bash
# CustomAdamW (Hina) with the SD-LoRA preset TOML; flags on the command line override the preset.
# Run from the repository root:
#   PRESET=configs/optimizers/customadamw_default.toml STEPS=1600 bash configs/examples/customadamw_preset.sh
set -euo pipefail

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-builtin:tiny-sd}
DATASET=${DATASET:-configs/examples/demo.toml}
STEPS=${STEPS:-200}
OUT=${OUT:-out/customadamw}
NAME=${NAME:-customadamw}
PRESET=${PRESET:-configs/optimizers/customadamw_sd_lora.toml}   # optimizer_type, learning_rate and all flags
DIM=${DIM:-16}
ALPHA=${ALPHA:-8}
WD_TRANSITION=${WD_TRANSITION:-800}    # steps at full weight decay; scale it with STEPS

"$PYTHON" train_network.py \
  --config_file "$PRESET" \
  --pretrained_model_name_or_path "$MODEL" \
  --dataset_config "$DATASET" \
  --output_dir "$OUT" \
  --output_name "$NAME" \
  --network_module networks.lora \
  --network_dim "$DIM" \
  --network_alpha "$ALPHA" \
  --wd_transition_steps "$WD_TRANSITION" \
  --max_train_steps "$STEPS" \
  --save_every_n_epochs 5 \
  --save_state \
  "$@"
