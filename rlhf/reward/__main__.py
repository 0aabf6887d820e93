"""``python -m rlhf.reward``: see ``rlhf.reward.train``."""

import sys

from rlhf.reward.train import main

if __name__ == "__main__":
    sys.exit(main())
