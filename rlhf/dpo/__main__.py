"""``python -m rlhf.dpo``: see ``rlhf.dpo.train``."""

import sys

from rlhf.dpo.train import main

if __name__ == "__main__":
    sys.exit(main())
