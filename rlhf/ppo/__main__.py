"""``python -m rlhf.ppo``: see ``rlhf.ppo.trainer``."""

import sys

from rlhf.ppo.trainer import main

if __name__ == "__main__":
    sys.exit(main())
