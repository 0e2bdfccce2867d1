"""`python generate.py ...`: the same command as gen_img.py (sd-scripts' name), under a plain name."""

import sys

from gen_img import main

if __name__ == "__main__":
    sys.exit(main())
