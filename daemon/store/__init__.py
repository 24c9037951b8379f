"""The checkpoint repository on a storage backend: what is committed and how to read it.

Owns the key layout and the versioned manifest (the commit point of each step), the index
of committed steps rebuilt from storage, restore plans (nearest base, then each delta) and
deletion that rebases dependants first. Used alike by the engine and by the CLI's direct
access to storage; knows nothing of chains in memory, sessions or gRPC
(``docs/ARCHITECTURE.md``, "Storage layout and commit protocol").
"""
