"""``python -m leap.evaluation linear|retrieval|knn ...`` (the same as ``leap eval ...``): an entry
point on top of the package, like ``python -m leap``."""

import sys

from leap.cli.evaluate import main

sys.exit(main())
