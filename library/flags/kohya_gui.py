"""Keys the kohya_ss GUI writes into the --config_file it hands to sd-scripts that are no sd-scripts option.

sd-scripts reads a config file into its namespace without refusing extra keys, and none of these is read by
train_network.py, so a GUI config trains the same here when they are accepted and left without effect. Each
carries what the user should know instead, logged once when the file is read.
"""

from __future__ import annotations

KOHYA_GUI_KEYS: dict[str, str] = {
    "epoch": "the GUI's epoch count; max_train_epochs / max_train_steps set the length",
    "noise_offset_type": "the GUI's choice of noise_offset or multires_noise_*; those keys carry it",
    "lowvram": "a GUI memory preset with no sd-scripts option behind it",
    "stop_text_encoder_training": "a DreamBooth option that train_network.py does not read",
    "loraplus_lr_ratio": "train_network.py does not read it; give --network_args loraplus_lr_ratio=R",
    "loraplus_unet_lr_ratio": "train_network.py does not read it; give --network_args loraplus_unet_lr_ratio=R",
    "loraplus_text_encoder_lr_ratio": "train_network.py does not read it; give --network_args "
                                      "loraplus_text_encoder_lr_ratio=R",
}
