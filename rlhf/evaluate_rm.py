"""``python -m rlhf.evaluate_rm``: reward-model accuracy tables; the code is ``rlhf.reward.evaluate``."""

import sys

from rlhf.reward.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
