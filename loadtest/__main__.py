"""``python -m lorafleet.loadtest loadtest run|compare ...`` / ``... bench SCENARIO``."""

import sys

from lorafleet.loadtest.cli import main

if __name__ == "__main__":
    sys.exit(main())
