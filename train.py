"""OpenToMe-style entry (`python train.py --config-file cfg.toml`): an alias of train_network.py.

`--config-file` is accepted as a spelling of `--config_file`; everything else is train_network.py's command line.
"""

import sys

from library.training.entry import main

if __name__ == "__main__":
    argv = ["--config_file" if a == "--config-file" else a.replace("--config-file=", "--config_file=", 1) for a in sys.argv[1:]]
    sys.exit(main(argv))
