#!/usr/bin/env bash
# SDXL LoRA, sd-scripts style (sdxl_train_network.py). Run from the repository root:
#   MODEL=/models/sd_xl_base_1.0.safetensors DATASET=my_sdxl_dataset.toml OUT=out/sdxl \
#     bash configs/examples/sdxl_lora.sh
# SDXL needs a real SDXL checkpoint: builtin:tiny-sd is SD1, so the default MODEL stops at model loading with
# a one-line error. SDXL trains at 1024x1024: set resolution = 1024 in your dataset TOML.
set -euo pipefail

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-builtin:tiny-sd}        # an SDXL .safetensors file or diffusers folder
DATASET=${DATASET:-configs/examples/demo.toml}
STEPS=${STEPS:-1600}
OUT=${OUT:-out/sdxl_lora}
NAME=${NAME:-sdxl_lora}
DIM=${DIM:-32}
ALPHA=${ALPHA:-16}
LR=${LR:-1e-4}
PRECISION=${PRECISION:-bf16}           # "no" on a CPU
CUDA_GRAPHS=${CUDA_GRAPHS:-1}          # 1: --cuda_graphs (GPU step replayed as a CUDA graph, ~10x on an H100)
EXTRA=()
if [[ "$CUDA_GRAPHS" == 1 && "$PRECISION" != "no" ]]; then EXTRA+=(--cuda_graphs); fi

"$PYTHON" sdxl_train_network.py \
  --pretrained_model_name_or_path "$MODEL" \
  --dataset_config "$DATASET" \
  --output_dir "$OUT" \
  --output_name "$NAME" \
  --network_module networks.lora \
  --network_dim "$DIM" \
  --network_alpha "$ALPHA" \
  --network_train_unet_only \
  --optimizer_type AdamW8bit \
  --learning_rate "$LR" \
  --lr_scheduler constant_with_warmup \
  --lr_warmup_steps 100 \
  --max_train_steps "$STEPS" \
  --mixed_precision "$PRECISION" \
  --gradient_checkpointing \
  --cache_latents \
  --save_precision fp16 \
  --save_every_n_steps 500 \
  --save_state \
  --seed 42 \
  ${EXTRA[@]+"${EXTRA[@]}"} \
  "$@"
