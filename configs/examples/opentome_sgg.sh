#!/usr/bin/env bash
# OpenToMe style: SGG settings from SGG_* environment variables, the optimizer from an [optimizer] table,
# every option in one TOML, run with `python train.py --config-file`. Run from the repository root:
#   OPTIMIZER=AdafactorSGG SGG_N_CLUSTERS=3 STEPS=1000 bash configs/examples/opentome_sgg.sh
# Precedence: command-line flag > --optimizer_args > [optimizer] table > SGG_* variable > default.
set -euo pipefail

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-builtin:tiny-sd}
DATASET=${DATASET:-configs/examples/demo.toml}
STEPS=${STEPS:-200}
OUT=${OUT:-out/opentome_sgg}
NAME=${NAME:-opentome_sgg}
OPTIMIZER=${OPTIMIZER:-AdamWSGG}       # AdamWSGG, AdamWSGG_v2, AdafactorSGG, LambSGG_v2, ShampooSGG_v2
LR=${LR:-3e-4}
CONFIG=${CONFIG:-$OUT/$NAME.config.toml}

export SGG_N_CLUSTERS=${SGG_N_CLUSTERS:-5}
export SGG_RECLUSTER_INTERVAL=${SGG_RECLUSTER_INTERVAL:-1000}
export SGG_SCALE_BOUND=${SGG_SCALE_BOUND:-"(1, 10.0)"}
export SGG_BETA3=${SGG_BETA3:-0.9}

mkdir -p "$OUT"
cat > "$CONFIG" <<TOML
[model]
pretrained_model_name_or_path = "$MODEL"

[dataset]
dataset_config = "$DATASET"

[network]
network_module = "networks.lora"
network_dim = 16
network_alpha = 8

[training]
max_train_steps = $STEPS
lr_scheduler = "constant"

[saving]
output_dir = "$OUT"
output_name = "$NAME"
save_every_n_epochs = 5
save_state = true

[optimizer]
name = "$OPTIMIZER"
lr = $LR
weight_decay = 1e-2
TOML

"$PYTHON" train.py --config-file "$CONFIG" "$@"
