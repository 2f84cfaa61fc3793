"""``python -m fm_train.cli ...``: the same as the ``fm-train`` console script."""

import sys

from fm_train.cli import main

sys.exit(main())
