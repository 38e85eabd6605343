"""``python -m gradnorm reproduce ...``: the same command line as the ``gradnorm`` console script."""

import sys

from gradnorm.reproduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
