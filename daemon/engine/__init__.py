"""The checkpoint engine: every chain's in-memory state and the life of each save.

Owns the chains (head reconstruction, saves in flight, chain policy), save sessions
(receive buffers between header and acceptance), the save pipeline (encoding → writing →
committed | failed), the in-flight byte budget, request validation and the observer hook.
It stores through ``ckptd.daemon.store`` and never imports gRPC: the server adapts it to
the wire (``docs/ARCHITECTURE.md``, "Layers").
"""

from ckptd.daemon.engine.core import Engine
from ckptd.daemon.engine.observer import EngineObserver
from ckptd.daemon.engine.session import SaveSession

__all__ = ["Engine", "EngineObserver", "SaveSession"]
