"""``python -m leap ...`` is the ``leap`` command (see :mod:`leap.cli`)."""

import sys

from leap.cli import main

if __name__ == "__main__":
    sys.exit(main())
