"""``python -m rlhf.gatt``: see ``rlhf.gatt.cli``."""

import sys

from rlhf.gatt.cli import main

if __name__ == "__main__":
    sys.exit(main())
