"""``python -m leap.evaluation linear|retrieval|knn ...`` (the same as ``leap eval ...``)."""

import sys

from .cli import main

sys.exit(main())
