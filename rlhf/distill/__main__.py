"""``python -m rlhf.distill``: see ``rlhf/distill/train.py``."""

import sys

from rlhf.distill.train import main

if __name__ == "__main__":
    sys.exit(main())
