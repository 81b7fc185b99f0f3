"""``python -m lowprec ...`` and ``torchrun ... -m lowprec train ...`` run the CLI."""

import sys

from lowprec.cli import main

if __name__ == "__main__":
    sys.exit(main())
