"""The ``ckptd`` command line: ``serve`` plus the inspection commands.

``ls``, ``info``, ``export``, ``verify`` and ``rm`` are written once against ``Catalog``,
which has two implementations: over a running daemon (gRPC) and straight on storage
(through ``ckptd.daemon.store``). ``app.main`` is the console script's entry point.
"""

from ckptd.daemon.cli.app import main

__all__ = ["main"]
