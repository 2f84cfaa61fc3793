"""``python -m data_shards ...``: the ``fm-train shard`` command without fm-train."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
