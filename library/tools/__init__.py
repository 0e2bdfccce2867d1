"""The post-training tools sd-scripts ships under `networks/` (merge, SVD merge, resize, extract, check) and
`gen_img.py`: the maths in plain functions (`lora_math`), files in `lora_files`, models in `checkpoint`."""
