"""Third-party start-up noise, silenced at its source so that the console shows only what concerns the run.

Each entry names a library logger or warning whose message says nothing a user can act on: optional native
kernels a CPU build lacks (bitsandbytes, torchao), torch's notice about a registration torchao makes, diffusers'
note on an empty keep-in-float32 list and its scheduler-config fix-ups when sampling, transformers' image-processor
fallbacks. Our own loggers are never touched.
"""

from __future__ import annotations

import logging
import os
import warnings

# logger name -> level under which its records are dropped
_LIBRARY_LOGGERS = {
    "bitsandbytes": logging.ERROR,          # "Failed to load CPU gemm_4bit_forward from kernels-community"
    "torchao": logging.ERROR,               # "Failed to load ..._C_mxfp8.so", "Detected no triton"
    "torch.utils._pytree": logging.ERROR,   # "<enum ...> is an Enum subclass ... register_constant() deprecated"
    "diffusers": logging.ERROR,             # "Unable to import torchao Tensor objects", "kept in float32: []"
    "transformers": logging.ERROR,          # "requires torchvision (not installed); falling back to ...Pil"
    "accelerate": logging.WARNING,
    "PIL": logging.WARNING,
    "matplotlib": logging.WARNING,
    "torch": logging.WARNING,
}
_WARNING_MESSAGES = (
    r".*requires torchvision.*",
    r".*should be kept in float32.*",
    # diffusers' pipeline rewrites a scheduler config's steps_offset / clip_sample and warns each time it samples
    r"(?s)The configuration file of this scheduler.*",
)


def silence_library_noise() -> None:
    """Set the levels before the libraries are imported: several of them log while importing."""
    for name, level in _LIBRARY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for pattern in _WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=pattern)
    # diffusers and transformers set their own loggers' level at import, from these variables (a user's value wins)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
