"""``python -m rlhf.sft``: see ``rlhf.sft.train``."""

import sys

from rlhf.sft.train import main

if __name__ == "__main__":
    sys.exit(main())
