"""``python -m clients``: see :mod:`clients.cli` (``python -m clients --help``)."""

import sys

from clients.cli import main

if __name__ == "__main__":
    sys.exit(main())
