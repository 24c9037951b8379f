"""``python -m ckptd.daemon.cli``: the ``ckptd`` command without the console script."""

import sys

from ckptd.daemon.cli.app import main

sys.exit(main())
