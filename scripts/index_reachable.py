"""Exit 0 when a package index answers an HTTP GET within a timeout, 1 otherwise (stdlib only).

    python scripts/index_reachable.py URL [--timeout SECONDS]

``scripts/bootstrap.sh`` asks this before it hands PyTorch's CPU wheel index to pip: pip itself
would retry an unreachable index several times with back-off (and this machine kind's pip config
sets a 180 s socket timeout), so a quick probe is what keeps the fallback to the default index fast.
It prints nothing on success and one short reason on failure, to stderr.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def reachable(url: str, timeout_s: float) -> tuple[bool, str]:
    """Whether ``url`` answers with a 2xx status within ``timeout_s``, and why not when it does not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s) as reply:
            return 200 <= reply.status < 300, f"HTTP {reply.status}"
    except urllib.error.HTTPError as err:  # a 404 means the index lacks the project: no use either
        return False, f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return False, str(getattr(err, "reason", err))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    ok, why = reachable(args.url, args.timeout)
    if not ok:
        print(why, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
