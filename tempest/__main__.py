"""``python -m tempest``: the same as the ``tempest`` command (see :mod:`tempest.cli`)."""

import sys

from tempest.cli import main

if __name__ == "__main__":
    sys.exit(main())
