"""The ``ckptd`` command line.

``ckptd serve --storage PATH_OR_URL --listen ADDR`` runs the daemon; ``ls``, ``info``,
``export``, ``verify`` and ``rm`` inspect and manage checkpoints through a daemon or
directly on storage (``ckptd.daemon.cli.commands`` and ``cli_actions``). Each subcommand is
registered by a function taking the subparsers object and setting ``handler`` (called as
``handler(args, environ) -> exit code``); subcommands in other modules are added by
listing their ``register`` function in ``COMMANDS``.

Every ``serve`` flag mirrors a ``DaemonConfig`` setting and the environment variable
``CKPTD_<FLAG>`` (``--max-inflight-bytes`` ↔ ``CKPTD_MAX_INFLIGHT_BYTES``); a flag wins
over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptd.daemon.cli import actions as cli_actions
from ckptd.daemon.cli import commands as cli_commands
from ckptd.daemon.config import SETTINGS, SWITCHES, DaemonConfig, env_name

Register = Callable[[Any], None]  # takes argparse's subparsers object

_SERVE_HELP = {
    "storage": "where checkpoints live: a directory, file:///dir or s3://bucket/prefix",
    "listen": "HOST:PORT to listen on (port 0 picks a free one) or unix:///path/to.sock",
    "loop": "event loop: auto (uvloop if installed), uvloop or asyncio",
    "log_level": "debug, info, warning or error",
    "log_format": "text (key=value lines) or json (one object per line)",
    "storage_mode": "mode of local storage files: private (0600, directories 0700), group "
                    "(0640/0750) or an octal file mode; independent of the umask",
    "metrics_listen": "HOST:PORT of the Prometheus /metrics endpoint (port 0 picks one); "
    "unset: none",
    "max_message_bytes": "largest gRPC message either way (e.g. 8MiB)",
    "max_chunk_bytes": "largest tensor chunk of a save, and restore chunk size (e.g. 1MiB)",
    "drain_timeout_s": "on SIGTERM, seconds accepted saves get to become durable",
    "stream_idle_timeout_s": "seconds a save stream may send (or a restore's client read) "
    "nothing before it is ended and its memory released",
    "max_inflight_bytes": "bytes of accepted-but-not-durable saves held at once (e.g. 2GiB)",
    "max_inflight_share": "fraction of the in-flight budget one trainer may hold while "
    "another holds or waits (alone it may use all of it)",
    "max_resident_bytes": "bytes of chain-head reconstructions kept in memory, least "
    "recently used evicted first (0: no bound)",
    "max_restore_bytes": "bytes of restored tensors held by restores being streamed",
    "max_checkpoint_bytes": "largest single checkpoint accepted",
    "base_interval": "a lossless base every this many saves of a (run, rank)",
    "max_delta_fraction": "also a new base once the deltas since the last one outweigh "
    "this fraction of its size",
    "bits": "default bit width of the lossy delta codec (1-8), or auto: per tensor and save "
    "the smallest within --auto-bits-max-error",
    "auto_bits_max_error": "error budget of --bits auto: relative L2 error the dropped "
    "buckets may add to a tensor's change (0-1)",
    "auto_bits_relative_to": "what --auto-bits-max-error is relative to: delta (the "
    "tensor's change) or state (the tensor itself)",
    "buckets_per_octave": "buckets per octave of a delta for tensors under the auto "
    "policy: 1 (exponent buckets), 2 or 4 (finer: less error at one width)",
    "representative": "value a kept bucket decodes to: mean or midrange",
    "coder": "entropy coder of lossy deltas: zstd or huffman (the paper's)",
    "base_compression": "lossless blobs: zstd, none (raw), or auto (raw when the measured "
                        "storage is faster than the coder)",
    "stream_saves": "encode a save while it is received: always (when its chain is idle), "
                    "ready (only into receive buffers mapped already), or never",
    "min_lossy_elements": "float tensors with fewer elements are stored exactly (under the "
    "auto policy)",
    "encode_workers": "threads that encode checkpoints",
    "retention_keep_last": "default retention (runs without their own policy): keep the "
    "newest N steps (0: off)",
    "retention_keep_every": "default retention: keep steps that are multiples of M forever",
    "retention_keep_interval_s": "default retention: keep one step per this many seconds",
    "retention_keep_best": "default retention: keep the K steps with the best "
    "--retention-best-metric",
    "retention_best_metric": "default retention: the metric keep_best ranks by",
    "retention_best_mode": "default retention: min or max (which values are best)",
    "retention_max_bytes": "default retention: cap on a run's stored bytes (deletes its "
    "oldest steps)",
    "test_pause_at": "TESTS ONLY, never in production: POINT:PATH stops the first deletion "
    "reaching POINT (group-manifests-deleted, rebase-blobs-written), writing PATH, until the "
    "daemon is killed",
    "lease_ttl_s": "seconds a chain's writer lease outlives its last renewal: how long "
    "another daemon waits before taking over a crashed daemon's chains",
    "lease_renew_interval_s": "seconds between renewals of held leases (at most a third "
    "of --lease-ttl-s)",
    "catalog_refresh_s": "seconds the catalog may lag steps other daemons on the same "
    "storage committed",
    "tls_cert": "PEM certificate chain: serve TLS on the TCP listener (with --tls-key)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle: require client certificates it signed (mTLS); the "
    "identity is the certificate's first SAN, else its CN",
    "auth_tokens": "file of '<sha256 hex> <identity>' lines: accepted bearer tokens "
    "(`ckptd token new NAME` prints one)",
    "auth_policy": "JSON file granting identities scopes (read, write, delete, admin) on "
    "run globs (SECURITY.md)",
    "insecure": "allow a non-loopback TCP listener without authentication",
}


# No argparse choices: DaemonConfig checks flag and environment values alike, in one place.
_METAVARS = {"storage": "URL", "listen": "ADDR", "loop": "LOOP", "log_level": "LEVEL",
             "log_format": "FORMAT", "metrics_listen": "ADDR", "storage_mode": "MODE",
             "representative": "KIND", "coder": "CODER", "base_compression": "MODE",
             "stream_saves": "MODE",
             "max_delta_fraction": "X", "auto_bits_relative_to": "WHAT",
             "retention_keep_interval_s": "SECONDS", "retention_best_metric": "NAME",
             "retention_best_mode": "MODE", "retention_max_bytes": "BYTES",
             "test_pause_at": "POINT:PATH",
             "lease_ttl_s": "SECONDS", "lease_renew_interval_s": "SECONDS",
             "catalog_refresh_s": "SECONDS",
             "tls_cert": "PEM", "tls_key": "PEM", "tls_client_ca": "PEM",
             "auth_tokens": "FILE", "auth_policy": "FILE", "insecure": "BOOL"}


def _register_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the checkpoint daemon",
        description="Run the checkpoint daemon until SIGTERM/SIGINT, then drain and exit 0.",
    )
    for name in SETTINGS:
        # A switch works bare (--insecure) and with a value (--insecure=false).
        switch: dict[str, Any] = {"nargs": "?", "const": "true"} if name in SWITCHES else {}
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar=_METAVARS.get(name, "N"),
            help=f"{_SERVE_HELP[name]} [env {env_name(name)}]",
            **switch,
        )
    parser.add_argument(
        "--ready-file",
        metavar="PATH",
        help="once serving, write {\"address\", \"pid\", \"storage_url\", "
        "\"metrics_address\"} JSON here atomically [env "
        f"{env_name('ready_file')}]",
    )
    parser.set_defaults(handler=_serve)


def _register_token(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "token",
        help="make bearer tokens for --auth-tokens",
        description="Print a fresh bearer token and the line that makes a daemon accept it.",
    )
    actions = parser.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = actions.add_parser("new", help="print a new token for IDENTITY and its tokens-file line")
    new.add_argument("identity", metavar="IDENTITY",
                     help="the name the daemon's --auth-policy grants scopes to")
    new.set_defaults(handler=_token_new)


def _token_new(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from ckptd.daemon.server.policy import hash_token, new_token

    identity = args.identity.strip()
    if not identity or any(c.isspace() for c in identity):
        print(f"ckptd token new: IDENTITY must be one word, got {args.identity!r}",
              file=sys.stderr)
        return 2
    token = new_token()
    # stdout: the secret, for the client; stderr: the line for the daemon's tokens file.
    print(token)
    print(f"# add to the daemon's --auth-tokens file (the token itself is not stored):\n"
          f"{hash_token(token)} {identity}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from ckptd.daemon import logs
    from ckptd.daemon.server import app as server

    _return_freed_memory_promptly(environ)
    try:
        config = DaemonConfig.from_env(environ, {name: getattr(args, name) for name in SETTINGS})
    except ValueError as exc:
        print(f"ckptd serve: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    ready_file = args.ready_file or environ.get(env_name("ready_file"))

    def on_ready(daemon: server.Daemon) -> None:
        metrics = f", metrics http://{daemon.metrics_address}/metrics" * bool(
            daemon.metrics_address)
        print(f"ckptd: serving on {daemon.address} (storage {daemon.storage_url}{metrics})",
              flush=True)
        if ready_file:
            write_ready_file(Path(ready_file), daemon.address, daemon.storage_url,
                             daemon.metrics_address)

    try:
        server.run(config, on_ready)
    except (OSError, ImportError, ValueError) as exc:
        # StorageError is an OSError; messages name the URL or address that failed.
        print(f"ckptd serve: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
    return 0


# Allocations at least this large get their own mapping, unmapped (returned to the OS) on free.
_MMAP_THRESHOLD_BYTES = 256 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _return_freed_memory_promptly(environ: Mapping[str, str]) -> None:
    """Pins glibc's mmap threshold so that freed checkpoint buffers leave the process.

    glibc raises the threshold (up to 32 MiB) each time a mapped block is freed, after
    which buffers of a few MiB (gRPC chunks, codec chunks, small tensors) come from heap
    arenas that are rarely trimmed: the daemon's RSS then stays hundreds of MB above what
    it holds (measured in bench/daemon.py). A fixed threshold stops that. Only the CLI does
    this, since it owns the process; MALLOC_MMAP_THRESHOLD_ in the environment wins.
    """
    if "MALLOC_MMAP_THRESHOLD_" in environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return


def write_ready_file(path: Path, address: str, storage_url: str, metrics_address: str) -> None:
    """Writes the ready file atomically (temp file + rename), so pollers never read half.

    ``metrics_address`` is the metrics endpoint's ``host:port`` with its real port, or ""."""
    payload = json.dumps({"address": address, "pid": os.getpid(), "storage_url": storage_url,
                          "metrics_address": metrics_address})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(payload + "\n")
    os.replace(tmp, path)


# Subcommands, in help order. Other modules contribute their ``register`` here.
COMMANDS: tuple[Register, ...] = (
    _register_serve,
    cli_commands.register_ls,
    cli_commands.register_info,
    cli_actions.register_export,
    cli_actions.register_verify,
    cli_actions.register_rm,
    _register_token,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptd", description="Asynchronous delta-compressed checkpointing daemon."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Runs the ``ckptd`` command; returns its exit code (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.handler
    return handler(args, os.environ if environ is None else environ)
