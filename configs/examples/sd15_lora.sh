#!/usr/bin/env bash
# SD 1.5 LoRA, sd-scripts style. Run from the repository root; override any variable, extra flags go after:
#   MODEL=/models/v1-5-pruned-emaonly.safetensors DATASET=my_dataset.toml STEPS=1600 OUT=out/mylora \
#     bash configs/examples/sd15_lora.sh --mixed_precision bf16
# The defaults train the tiny offline model on the demo data; make the images first:
#   python -m library.data.synthetic demo_data/concept --n 32 --concept
set -euo pipefail

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-builtin:tiny-sd}        # diffusers folder, .safetensors/.ckpt file, or builtin:tiny-sd
DATASET=${DATASET:-configs/examples/demo.toml}
STEPS=${STEPS:-200}
OUT=${OUT:-out/sd15_lora}
NAME=${NAME:-sd15_lora}
DIM=${DIM:-16}
ALPHA=${ALPHA:-8}
UNET_LR=${UNET_LR:-1e-4}
TE_LR=${TE_LR:-5e-5}
PRECISION=${PRECISION:-no}             # fp16 or bf16 on a GPU

"$PYTHON" train_network.py \
  --pretrained_model_name_or_path "$MODEL" \
  --dataset_config "$DATASET" \
  --output_dir "$OUT" \
  --output_name "$NAME" \
  --network_module networks.lora \
  --network_dim "$DIM" \
  --network_alpha "$ALPHA" \
  --optimizer_type AdamW \
  --learning_rate "$UNET_LR" \
  --unet_lr "$UNET_LR" \
  --text_encoder_lr "$TE_LR" \
  --lr_scheduler cosine \
  --max_train_steps "$STEPS" \
  --mixed_precision "$PRECISION" \
  --save_precision fp16 \
  --save_every_n_epochs 5 \
  --save_state \
  --seed 42 \
  "$@"
