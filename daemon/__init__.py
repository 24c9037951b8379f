"""The ckptd daemon: receives checkpoints, compresses them as deltas, keeps their chains.

One room per layer (``docs/ARCHITECTURE.md`` draws them and traces a save and a restore
through them); each room's ``__init__`` says what it owns:

* ``codec/``   — the LC-Checkpoint method as a pure library: numpy in, bytes out.
* ``storage/`` — backends (local directory, S3) behind one small byte-key interface.
* ``store/``   — the checkpoint repository on top of a backend: key layout, manifests,
  the index of committed steps, restore plans, deletion.
* ``engine/``  — chains, save sessions, the save pipeline, the in-flight budget, the
  chain policy and request validation. No gRPC.
* ``server/``  — the asyncio gRPC service and everything transport-shaped: conversion,
  the error-status table, shared memory, metrics, health, the lifecycle.
* ``cli/``     — the ``ckptd`` command: ``serve`` and the inspection commands.

The modules at this level are what every room shares: ``errors`` (the exception tree),
``domain`` (transport-free records), ``config`` (typed settings), ``logs`` and ``pools``.
"""
