"""Generate images with a base model and LoRAs from prompts (sd-scripts' gen_img.py command line, the options
loraforge supports); each PNG carries its prompt, seed and settings in its metadata."""

import argparse
import sys

from library.tools.runner import tool_main


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--ckpt",
        type=str,
        default=None,
        help="model: a .safetensors/.ckpt file, a diffusers folder or builtin:tiny-sd",
    )
    parser.add_argument("--v2", action="store_true", help="a Stable Diffusion 2.x model")
    parser.add_argument("--v_parameterization", action="store_true", help="v-prediction (SD 2.x 768-v)")
    parser.add_argument("--sdxl", action="store_true", help="an SDXL model")
    parser.add_argument(
        "--prompt", type=str, default=None, help="one prompt, with gen_img.py's prompt options"
    )
    parser.add_argument("--from_file", type=str, default=None, help="a file of prompts, one per line")
    parser.add_argument("--outdir", type=str, default="outputs", help="folder for the PNGs")
    parser.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt")
    parser.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list this often")
    parser.add_argument("--W", type=int, default=None, help="image width (512, 768 for SD2 v, 1024 for SDXL)")
    parser.add_argument("--H", type=int, default=None, help="image height")
    parser.add_argument("--batch_size", type=int, default=1, help="images generated together")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument(
        "--sampler",
        type=str,
        default="ddim",
        help="sampler: ddim, pndm, lms, euler, euler_a, "
        "heun, dpm_2, dpm_2_a, dpmsolver, dpmsolver++, dpmsingle (k_ names accepted)",
    )
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed, or the seed of the seeds of many images"
    )
    parser.add_argument("--sequential_file_name", action="store_true", help="name files im_000001.png, ...")
    parser.add_argument("--fp16", action="store_true", help="run in float16 (GPU)")
    parser.add_argument("--bf16", action="store_true", help="run in bfloat16")
    parser.add_argument("--device", type=str, default=None, help="cpu, cuda or cuda:N (cuda when available)")
    parser.add_argument("--network_module", type=str, nargs="*", default=None, help="networks.lora")
    parser.add_argument("--network_weights", type=str, nargs="*", default=None, help="LoRA files")
    parser.add_argument("--network_mul", type=float, nargs="*", default=None, help="one multiplier per LoRA")
    parser.add_argument("--network_merge", action="store_true", help="merge the LoRAs into the weights")
    return parser


main = tool_main(setup_parser, "library.tools.generate:generate_images")


if __name__ == "__main__":
    sys.exit(main())
