"""The daemon as a gRPC server: the only room of the daemon that speaks the wire.

Owns the lifecycle (start → serve → drain → close), the ``CheckpointdService`` servicer, the
conversions between protobuf messages and domain records, the one table from errors to
gRPC statuses, the shared-memory reader, metrics, health and the event-loop factory. It
converts, calls the engine and converts back; no business logic lives here
(``docs/ARCHITECTURE.md``, "Layers").
"""
