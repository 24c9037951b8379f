"""Typed, frozen configuration of the daemon; units are in the field names.

``EngineConfig`` is what the transport-free engine needs; ``DaemonConfig`` adds the server's
settings. The CLI flags and ``CKPTD_*`` environment variables are thin layers that fill
these fields (``ckptd.daemon.cli``); nothing reads the environment at import time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptd.daemon.domain import RetentionPolicy

GiB = 1 << 30
# ``EngineConfig.default_bits`` (and ``ServerInfo.default_bits``) of the adaptive width.
AUTO_BITS = 0
MiB = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the checkpoint engine (chains, codec, budget, limits)."""

    # Bytes of received-but-not-yet-durable checkpoint data the daemon holds at once.
    # Resident memory is bounded by this, the reconstructions (max_resident_bytes) and the
    # restores (max_restore_bytes); README, "Memory bound".
    max_inflight_bytes: int = 2 * GiB
    # The fraction of max_inflight_bytes one identity (trainer) may hold while another
    # identity holds or waits for bytes; alone, an identity may use the whole budget.
    max_inflight_share: float = 0.5
    # Bytes of chain-head reconstructions kept in memory, least recently used evicted
    # first (rebuilt from storage by that chain's next save); 0 keeps every head. Heads of
    # chains with a save in flight are never evicted.
    max_resident_bytes: int = 4 * GiB
    # Bytes of restored tensors held by restores being streamed; a restore waits for room
    # (one larger than this runs alone).
    max_restore_bytes: int = 2 * GiB
    # The defaults of the next knobs are chosen from measured recovery evidence
    # (bench/RESULTS.md; bench/README.md, "The per-optimizer rule for AdamW" and "Finer
    # buckets for the weights"): longer chains cost little restore time and save space.
    # A new lossless base every this many saves of a (run, rank).
    base_interval: int = 50
    # Also a new base once the deltas since the base outweigh this fraction of it.
    max_delta_fraction: float = 8.0
    # Bit width of lossy tensors whose client gives none; 0 = AUTO_BITS: per tensor and
    # per save the smallest width whose dropped buckets add at most auto_bits_max_error
    # relative L2 error (``ckptd.daemon.codec.encode_delta``, bits="auto"). 4 with two
    # buckets per octave: the tensors the daemon decides about are the weights of SGD runs
    # and of states without an optimizer (the client's built-in rules fix Adam's widths);
    # LeNet with SGD, weights at 4 bits and 2 buckets per octave (momentum b2): 16.0-17.3x
    # smaller deltas than torch.save at K=10 and 50, both seeds, rework 0.85-0.99x exact.
    default_bits: int = 4
    # The error budget of AUTO_BITS, in [0, 1).
    auto_bits_max_error: float = 0.2
    # What that budget is relative to: "delta" (the tensor's change since the reference) or
    # "state" (the reference itself: a small change between frequent saves gets fewer bits
    # than a large one between sparse saves). An experiment (bench/README.md, "State-
    # relative auto budget"); only the widths chosen differ, not the format.
    auto_bits_relative_to: str = "delta"
    # Buckets per octave of the delta for the tensors the daemon decides about (policy AUTO:
    # the weights; a client's lossy rules keep octaves): 1 is LC-Checkpoint's exponent
    # buckets; 2 or 4 split each octave by the top mantissa bits, for a smaller restored
    # error at one width (bench/README.md, "Finer buckets for the weights": at b4, 2 per
    # octave restore lm's weights as well as octaves for 0.45-0.6 fewer bits per element).
    # Encode-side only: the blob format and decode are the same.
    buckets_per_octave: int = 2
    representative: str = "mean"
    coder: str = "zstd"
    # Lossless blobs (bases, exact tensors): "zstd" (byte planes + zstd), "none" (raw), or
    # "auto": raw when the measured storage is faster than the coder (engine/basecoding.py).
    base_compression: str = "auto"
    # Encode a save while it is received (engine/streaming.py): "always" (when its chain is
    # idle), "ready" (and only when every receive buffer was mapped already: the copy does
    # not fault pages in while the codec threads run), or "never" (encode from ACCEPTED).
    stream_saves: str = "always"
    # Float tensors with fewer elements than this are stored exactly when the client leaves
    # the policy to the daemon (POLICY_UNSPECIFIED); reported as ServerInfo.lossy_min_elements.
    # 1: every float tensor lossy. LeNet's deltas were a third exact small tensors (biases,
    # its first conv); bench/RESULTS.md's targets are measured with them lossy (the
    # shipped defaults), and the 2026-12-04 sweep (1024 against 1) measured the same worst
    # rework (1.11) for 6 % fewer delta bytes (bench/README.md, "Small tensors").
    min_lossy_elements: int = 1
    max_checkpoint_bytes: int = 256 * GiB
    max_tensors: int = 100_000
    max_name_chars: int = 1024
    max_metadata_bytes: int = 16 * MiB
    # Threads that run the codec; numpy and zstd release the GIL.
    encode_workers: int = 2
    # Threads that call the storage backend (blocking I/O, kept apart from the codec's).
    storage_workers: int = 4
    # The retention policy of runs that set none of their own (README, "Retention");
    # every rule 0: steps are never deleted automatically.
    retention_keep_last: int = 0
    retention_keep_every: int = 0
    retention_keep_interval_s: float = 0.0
    retention_keep_best: int = 0
    retention_best_metric: str = ""
    retention_best_mode: str = "min"
    retention_max_bytes: int = 0
    # For tests only, never in production: "POINT:PATH" makes the first deletion that
    # reaches POINT (ckptd.daemon.store.deletion.PAUSE_POINTS, between two of its storage
    # operations) write PATH and wait there, holding its chain, until the process ends, so
    # that a test can SIGKILL the daemon provably mid-deletion. Empty (the default): off.
    test_pause_at: str = ""
    # Many daemons on one storage (README, "Many hosts"). A chain's writer lease lasts this
    # long past its last renewal: the longest a crashed daemon's ranks wait before another
    # daemon may take their chains over. Clocks of the hosts must agree well within it.
    lease_ttl_s: float = 30.0
    # How often held leases are renewed (at most a third of lease_ttl_s, so that two
    # renewals may fail before a lease lapses); a lease whose chain saw no save for
    # lease_ttl_s is released instead.
    lease_renew_interval_s: float = 10.0
    # The catalog (list, restore, delete) reads steps other daemons committed at most this
    # long after they were committed; a run or step the catalog does not know is looked up
    # in storage at once.
    catalog_refresh_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_inflight_bytes <= 0:
            raise ValueError(f"max_inflight_bytes must be positive, got {self.max_inflight_bytes}")
        if not 0.0 < self.max_inflight_share <= 1.0:  # also refuses NaN
            raise ValueError(
                f"max_inflight_share must be in (0, 1], got {self.max_inflight_share}"
            )
        if self.max_resident_bytes < 0:
            raise ValueError(f"max_resident_bytes must be >= 0, got {self.max_resident_bytes}")
        if self.max_restore_bytes <= 0:
            raise ValueError(f"max_restore_bytes must be positive, got {self.max_restore_bytes}")
        if self.base_interval < 1:
            raise ValueError(f"base_interval must be >= 1, got {self.base_interval}")
        if not self.max_delta_fraction >= 0:  # also refuses NaN; 0: one delta per base
            raise ValueError(f"max_delta_fraction must be >= 0, got {self.max_delta_fraction}")
        if self.min_lossy_elements < 1:
            raise ValueError(f"min_lossy_elements must be >= 1, got {self.min_lossy_elements}")
        if not 0 <= self.default_bits <= 8:
            raise ValueError(f"default_bits must be in 1..8, got {self.default_bits}; 0 "
                             "(--bits auto) picks a width per tensor and save")
        if not 0.0 <= self.auto_bits_max_error < 1.0:  # also refuses NaN
            raise ValueError(
                f"auto_bits_max_error must be in [0, 1), got {self.auto_bits_max_error}")
        if self.auto_bits_relative_to not in ("delta", "state"):
            raise ValueError(f"auto_bits_relative_to must be 'delta' or 'state', got "
                             f"{self.auto_bits_relative_to!r}")
        if self.buckets_per_octave not in (1, 2, 4):
            raise ValueError(f"buckets_per_octave must be 1, 2 or 4, got "
                             f"{self.buckets_per_octave!r}")
        if self.representative not in ("mean", "midrange"):
            raise ValueError(
                f"representative must be 'mean' or 'midrange', got {self.representative!r}"
            )
        if self.coder not in ("zstd", "huffman"):
            raise ValueError(f"coder must be 'zstd' or 'huffman', got {self.coder!r}")
        if self.base_compression not in ("auto", "zstd", "none"):
            raise ValueError(f"base_compression must be 'auto', 'zstd' or 'none', got "
                             f"{self.base_compression!r}")
        if self.stream_saves not in ("always", "ready", "never"):
            raise ValueError(f"stream_saves must be 'always', 'ready' or 'never', got "
                             f"{self.stream_saves!r}")
        if self.encode_workers < 1:
            raise ValueError(f"encode_workers must be >= 1, got {self.encode_workers}")
        if self.storage_workers < 1:
            raise ValueError(f"storage_workers must be >= 1, got {self.storage_workers}")
        self.retention  # noqa: B018 - raises ValueError naming the bad rule
        point, _, path = self.test_pause_at.partition(":")
        if self.test_pause_at and not (point and path):
            raise ValueError(f"test_pause_at must be POINT:PATH, got {self.test_pause_at!r}")
        self._check_leases()

    def _check_leases(self) -> None:
        if not self.lease_ttl_s > 0:  # also refuses NaN
            raise ValueError(f"lease_ttl_s must be positive, got {self.lease_ttl_s}")
        if not 0 < self.lease_renew_interval_s <= self.lease_ttl_s / 3:
            raise ValueError(
                f"lease_renew_interval_s must be in (0, lease_ttl_s / 3 = "
                f"{self.lease_ttl_s / 3:g}], got {self.lease_renew_interval_s}"
            )
        if not self.catalog_refresh_s >= 0:
            raise ValueError(f"catalog_refresh_s must be >= 0, got {self.catalog_refresh_s}")

    @property
    def retention(self) -> RetentionPolicy:
        """The default retention policy, from the ``retention_*`` fields."""
        return RetentionPolicy(
            keep_last=self.retention_keep_last, keep_every=self.retention_keep_every,
            keep_interval_s=self.retention_keep_interval_s,
            keep_best=self.retention_keep_best, best_metric=self.retention_best_metric,
            best_mode=self.retention_best_mode, max_bytes=self.retention_max_bytes,
        )


LOOPS = ("auto", "uvloop", "asyncio")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
ENV_PREFIX = "CKPTD_"
# Room a save/restore message needs beyond its chunk's bytes (field tags, index, offset).
_MESSAGE_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class DaemonConfig:
    """Settings of the daemon process: where it listens, where it stores, how it runs.

    Every field has a CLI flag (``--max-chunk-bytes``) and an environment variable
    (``CKPTD_MAX_CHUNK_BYTES``); ``from_settings`` is the one place that parses them.
    """

    storage_url: str
    # ``host:port`` (port 0 picks a free port; the real one is reported) or ``unix:///path``.
    listen: str = "127.0.0.1:50051"
    loop: str = "auto"
    engine: EngineConfig = field(default_factory=EngineConfig)
    # gRPC's limit on one message either way; a save chunk must fit with room to spare.
    max_message_bytes: int = 8 * MiB
    # Largest tensor chunk a client may send, and the size of the chunks restores stream.
    max_chunk_bytes: int = 1 * MiB
    # On SIGTERM, how long accepted saves get to become durable before the daemon exits.
    drain_timeout_s: float = 60.0
    # A save stream that sends nothing for this long is ended (DEADLINE_EXCEEDED, reason
    # STREAM_IDLE) and its step and budget released; so is a restore whose client reads
    # nothing for this long, releasing its restore budget.
    stream_idle_timeout_s: float = 60.0
    log_level: str = "info"
    # "text" (key=value lines) or "json" (one object per line, for log pipelines).
    log_format: str = "text"
    # ``host:port`` of the Prometheus endpoint (``/metrics``; port 0 picks a free port, the
    # real one is reported); empty serves no endpoint.
    metrics_listen: str = ""
    # TLS on a TCP listener: the server's PEM certificate chain and key (both or neither).
    tls_cert: str = ""
    tls_key: str = ""
    # PEM CA bundle: with it, clients must present a certificate it signed (mTLS).
    tls_client_ca: str = ""
    # File of "<sha256 hex> <identity>" lines: the bearer tokens the daemon accepts.
    auth_tokens: str = ""
    # JSON file of grants (identity glob, run globs, scopes); see daemon/server/policy.py.
    auth_policy: str = ""
    # Serve a TCP listener off loopback with no authentication (anyone reaching it may read,
    # write and delete every run). Refused without this.
    insecure: bool = False
    # Mode of a local storage's files (directories get execute where it reads): 0600 keeps
    # checkpoints to the daemon's user whatever the umask; 0640 lets its group read them.
    storage_mode: int = 0o600

    def __post_init__(self) -> None:
        if not self.storage_url:
            raise ValueError("storage_url is empty; pass --storage URL or set CKPTD_STORAGE")
        if not self.listen:
            raise ValueError("listen is empty; pass --listen HOST:PORT or unix:///PATH")
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {self.loop!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise ValueError(
                f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}"
            )
        if self.metrics_listen:
            parse_listen(self.metrics_listen)
        if self.max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes must be positive, got {self.max_chunk_bytes}")
        if self.max_chunk_bytes + _MESSAGE_OVERHEAD_BYTES > self.max_message_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must exceed max_chunk_bytes "
                f"({self.max_chunk_bytes}) by at least {_MESSAGE_OVERHEAD_BYTES} bytes"
            )
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not self.stream_idle_timeout_s > 0:  # also refuses NaN
            raise ValueError(
                f"stream_idle_timeout_s must be positive, got {self.stream_idle_timeout_s}"
            )
        if parse_storage_mode(f"{self.storage_mode:o}") != self.storage_mode:
            raise ValueError(f"storage_mode {self.storage_mode:#o} is not a file mode")
        self._check_security()

    @property
    def auth_configured(self) -> bool:
        """Whether callers must authenticate (tokens, client certificates or a policy)."""
        return bool(self.auth_tokens or self.tls_client_ca or self.auth_policy)

    def _check_security(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together; pass both --tls-cert and "
                             "--tls-key (PEM files), or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mTLS) needs the server's own --tls-cert and "
                             "--tls-key")
        if self.listen.startswith("unix"):
            if self.tls_cert:
                raise ValueError(f"TLS applies to TCP listeners, not {self.listen!r}: a unix "
                                 "socket is guarded by its file mode (0600); drop --tls-*")
            return
        if not (self.auth_tokens or self.tls_client_ca or self.insecure
                or is_loopback(self.listen)):
            raise ValueError(
                f"refusing to listen on {self.listen!r} without authentication: anyone who "
                "reaches a non-loopback port could read, overwrite and delete every run. "
                "Pass --auth-tokens FILE and/or --tls-cert/--tls-key/--tls-client-ca "
                "(SECURITY.md), listen on 127.0.0.1 or a unix socket, or pass --insecure "
                "if a network policy already fences the port"
            )

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics_listen`` as (host, port), or None when no endpoint is configured."""
        return parse_listen(self.metrics_listen) if self.metrics_listen else None

    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> DaemonConfig:
        """Builds a config from flat text settings named like the CLI flags.

        Keys are the names of ``SETTINGS`` (``storage``, ``max_inflight_bytes``, ...);
        absent keys keep their defaults. Raises ``ValueError`` naming the bad setting.
        """
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
        if not settings.get("storage"):
            raise ValueError(
                f"no storage given; pass --storage PATH_OR_URL or set {env_name('storage')}"
            )
        parsed: dict[str, dict[str, Any]] = {"daemon": {}, "engine": {}}
        for name, text in settings.items():
            target, attr, parse = SETTINGS[name]
            try:
                parsed[target][attr] = parse(text)
            except ValueError as exc:
                raise ValueError(f"bad value {text!r} for {name}: {exc}") from None
        engine = EngineConfig(**parsed["engine"])
        return cls(engine=engine, **parsed["daemon"])

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
    ) -> DaemonConfig:
        """Reads ``CKPTD_<SETTING>`` from ``environ``; non-None ``overrides`` (flags) win."""
        settings = {
            name: environ[env_name(name)] for name in SETTINGS if env_name(name) in environ
        }
        settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_settings(settings)


def env_name(setting: str) -> str:
    """The variable mirroring a setting: ``max_chunk_bytes`` → ``CKPTD_MAX_CHUNK_BYTES``."""
    return ENV_PREFIX + setting.upper()


_BYTE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
    "gb": 1000**3, "kib": 1 << 10, "mib": MiB, "gib": GiB, "tib": 1 << 40,
}


def parse_bytes(text: str) -> int:
    """Parses ``"1073741824"``, ``"512MiB"``, ``"2GiB"`` or ``"1.5GB"`` into a byte count."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _BYTE_UNITS:
        raise ValueError("expected a byte count such as 1048576, 512MiB or 2GiB")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()])


STORAGE_MODE_PRESETS = {"private": 0o600, "group": 0o640}


def parse_storage_mode(text: str) -> int:
    """Parses ``--storage-mode``: ``private`` (0600), ``group`` (0640) or an octal file
    mode such as ``0640``; the owner must keep read and write, and no execute bit is set."""
    text = text.strip().lower()
    if text in STORAGE_MODE_PRESETS:
        return STORAGE_MODE_PRESETS[text]
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o666 or mode & 0o111 or mode & 0o600 != 0o600:
        raise ValueError(
            "expected private (0600), group (0640) or an octal file mode from 0600 to 0666 "
            "without execute bits, e.g. 0640"
        )
    return mode


_LISTEN = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})$")


def parse_listen(address: str) -> tuple[str, int]:
    """Splits ``host:port`` or ``[v6]:port`` (as ``--metrics-listen`` takes it); an empty
    host means every IPv4 address.

    Raises:
        ValueError: naming the address when it has no port or the port is out of range.
    """
    match = _LISTEN.match(address.strip())
    port = int(match.group("port")) if match else -1
    if match is None or port > 65535:
        raise ValueError(
            f"metrics listen address {address!r} is not HOST:PORT (e.g. 0.0.0.0:9100, "
            "[::]:9100, 127.0.0.1:0) with a port in 0..65535"
        )
    host = match.group("v6") or match.group("host") or "0.0.0.0"
    return host, port


def is_loopback(listen: str) -> bool:
    """Whether a ``host:port`` listen address only accepts connections from this host."""
    host = listen.rpartition(":")[0].strip("[]").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def parse_bits(text: str) -> int:
    """``"1"``..``"8"``, or ``"auto"`` (``AUTO_BITS``): the default bit width setting."""
    text = text.strip().lower()
    return AUTO_BITS if text == "auto" else int(text)


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "1", "yes", "false", "0", "no", ""):
        raise ValueError("expected true or false")
    return value in ("true", "1", "yes")


def _parse_str(text: str) -> str:
    return text.strip()


def _parse_lower(text: str) -> str:
    return text.strip().lower()


# setting name → (which config, field name, parser). The CLI derives its flags from this.
SETTINGS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "storage": ("daemon", "storage_url", _parse_str),
    "listen": ("daemon", "listen", _parse_str),
    "loop": ("daemon", "loop", _parse_str),
    "log_level": ("daemon", "log_level", _parse_lower),
    "log_format": ("daemon", "log_format", _parse_lower),
    "metrics_listen": ("daemon", "metrics_listen", _parse_str),
    "storage_mode": ("daemon", "storage_mode", parse_storage_mode),
    "max_message_bytes": ("daemon", "max_message_bytes", parse_bytes),
    "max_chunk_bytes": ("daemon", "max_chunk_bytes", parse_bytes),
    "drain_timeout_s": ("daemon", "drain_timeout_s", float),
    "stream_idle_timeout_s": ("daemon", "stream_idle_timeout_s", float),
    "max_inflight_bytes": ("engine", "max_inflight_bytes", parse_bytes),
    "max_inflight_share": ("engine", "max_inflight_share", float),
    "max_resident_bytes": ("engine", "max_resident_bytes", parse_bytes),
    "max_restore_bytes": ("engine", "max_restore_bytes", parse_bytes),
    "max_checkpoint_bytes": ("engine", "max_checkpoint_bytes", parse_bytes),
    "base_interval": ("engine", "base_interval", int),
    "max_delta_fraction": ("engine", "max_delta_fraction", float),
    "bits": ("engine", "default_bits", parse_bits),
    "auto_bits_max_error": ("engine", "auto_bits_max_error", float),
    "auto_bits_relative_to": ("engine", "auto_bits_relative_to", _parse_lower),
    "buckets_per_octave": ("engine", "buckets_per_octave", int),
    "representative": ("engine", "representative", _parse_lower),
    "coder": ("engine", "coder", _parse_lower),
    "base_compression": ("engine", "base_compression", _parse_lower),
    "stream_saves": ("engine", "stream_saves", _parse_lower),
    "min_lossy_elements": ("engine", "min_lossy_elements", int),
    "encode_workers": ("engine", "encode_workers", int),
    "retention_keep_last": ("engine", "retention_keep_last", int),
    "retention_keep_every": ("engine", "retention_keep_every", int),
    "retention_keep_interval_s": ("engine", "retention_keep_interval_s", float),
    "retention_keep_best": ("engine", "retention_keep_best", int),
    "retention_best_metric": ("engine", "retention_best_metric", _parse_str),
    "retention_best_mode": ("engine", "retention_best_mode", _parse_lower),
    "retention_max_bytes": ("engine", "retention_max_bytes", parse_bytes),
    "test_pause_at": ("engine", "test_pause_at", _parse_str),
    "lease_ttl_s": ("engine", "lease_ttl_s", float),
    "lease_renew_interval_s": ("engine", "lease_renew_interval_s", float),
    "catalog_refresh_s": ("engine", "catalog_refresh_s", float),
    "tls_cert": ("daemon", "tls_cert", _parse_str),
    "tls_key": ("daemon", "tls_key", _parse_str),
    "tls_client_ca": ("daemon", "tls_client_ca", _parse_str),
    "auth_tokens": ("daemon", "auth_tokens", _parse_str),
    "auth_policy": ("daemon", "auth_policy", _parse_str),
    "insecure": ("daemon", "insecure", _parse_bool),
}
# Settings that are switches: a bare ``--insecure`` flag sets them to "true".
SWITCHES = frozenset({"insecure"})
