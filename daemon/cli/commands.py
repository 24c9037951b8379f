"""``ckptd ls``, ``info``, ``export``, ``verify`` and ``rm``: written once over ``Catalog``.

Each command works against a running daemon (``--target HOST:PORT|unix:///PATH``, default
``$CKPTD_TARGET``) or directly on a storage location (``--storage PATH_OR_URL``, no daemon
needed). ``run_command`` is the one place errors become output: any ``CkptdError`` (from
storage), ``CkptdClientError`` (from a daemon, mapped from its ``ErrorReason``),
``OSError``, ``ValueError`` or ``ImportError`` prints one line ``ckptd: error: ...`` and
exits with ``exit_code_for`` it: 69 when no daemon can serve now (unreachable, shutting
down, storage unavailable), 75 when trying again later may work (busy, timed out), else 1;
Ctrl-C exits 130. Results go to stdout, progress bars and prompts to stderr.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from ckptd.client.credentials import TOKEN_ENV, TlsFiles, resolve_token
from ckptd.client.errors import CkptdClientError, DaemonBusyError
from ckptd.client.policies import describe_builtin
from ckptd.daemon.cli.catalog import Catalog, open_catalog
from ckptd.daemon.cli.output import format_bytes, format_ratio, format_table, format_world
from ckptd.daemon.domain import RunInfo, StepKey
from ckptd.daemon.errors import CkptdError, RunNotFoundError, StepNotFoundError
from ckptd.daemon.store.quarantine import QuarantinedStep
from ckptd.protos.records import StepInfo

TARGET_ENV = "CKPTD_TARGET"
CommandBody = Callable[[Catalog, argparse.Namespace], int]
# Exit codes of failed commands (the last two from sysexits.h).
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 69
EXIT_TEMPFAIL = 75


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """``--target`` / ``--storage`` (mutually exclusive) and ``--timeout-s``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--target", metavar="ADDR",
        help=f"a running daemon: HOST:PORT or unix:///PATH [env {TARGET_ENV}]",
    )
    source.add_argument(
        "--storage", metavar="URL",
        help="read the storage directly, without a daemon: a directory, file:///DIR or "
        "s3://BUCKET/PREFIX",
    )
    parser.add_argument("--timeout-s", type=float, default=10.0, metavar="S",
                        help="longest wait for the daemon per listing call (default 10)")
    auth = parser.add_argument_group("authentication to a daemon (SECURITY.md)")
    auth.add_argument("--token", metavar="TOKEN",
                      help=f"bearer token the daemon accepts [env {TOKEN_ENV}]")
    auth.add_argument("--tls-ca", metavar="PEM",
                      help="speak TLS; the CA that signed the daemon's certificate")
    auth.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    auth.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")


def credentials_of(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[TlsFiles | None, str | None]:
    """The TLS files and bearer token the ``--tls-*``/``--token`` flags (or env) name."""
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = TlsFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    return tls, resolve_token(args.token, environ)


def run_command(body: CommandBody) -> Callable[[argparse.Namespace, Mapping[str, str]], int]:
    """Wraps a command body: opens the catalog the arguments name, maps errors once."""

    def handler(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
        target = args.target
        if target is None and args.storage is None:
            target = environ.get(TARGET_ENV) or None
        try:
            tls, token = credentials_of(args, environ)
            with open_catalog(target=target, storage=args.storage, timeout_s=args.timeout_s,
                              tls=tls, token=token) as catalog:
                return body(catalog, args)
        except KeyboardInterrupt:
            print("\nckptd: error: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader went away (`ckptd ls | head`): stop quietly, as Unix tools do, and
            # keep the interpreter's final flush of stdout from raising again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (CkptdError, CkptdClientError, OSError, ValueError, ImportError) as exc:
            print(f"ckptd: error: {one_line(exc)}", file=sys.stderr)
            return exit_code_for(exc)

    return handler


def exit_code_for(exc: BaseException) -> int:
    """The exit code of a command that failed with ``exc`` (see the module docstring)."""
    if isinstance(exc, DaemonBusyError | TimeoutError):
        return EXIT_TEMPFAIL
    if isinstance(exc, ConnectionError):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def ranks_of(catalog: Catalog, run: str, rank: int | None) -> list[int]:
    """The ranks of ``run`` to act on (``rank`` alone if given); raises the not-found
    error of the source when the run has none."""
    if rank is not None:
        catalog.list_steps(run, rank)  # raises RunNotFoundError naming what exists
        return [rank]
    ranks = [info.rank for info in catalog.list_runs() if info.run == run]
    if not ranks:
        catalog.list_steps(run, 0)  # the source's own message (known runs)
        raise RunNotFoundError(f"run {run!r} has no saved steps in {catalog.location}")
    return ranks


def resolve_step(catalog: Catalog, run: str, rank: int, step: int | None) -> StepInfo:
    """The listed step ``step`` of (run, rank), or its latest when ``step`` is None."""
    steps = catalog.list_steps(run, rank)
    if step is None:
        return steps[-1]
    for info in steps:
        if info.step == step:
            return info
    numbers = [info.step for info in steps]
    position = bisect.bisect_left(numbers, step)
    raise StepNotFoundError(
        f"step {StepKey(run, rank, step)} does not exist in {catalog.location}; nearby steps: "
        f"{numbers[max(0, position - 3) : position + 3]} (latest {numbers[-1]})"
    )


# -- ls -------------------------------------------------------------------------------------


def register_ls(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ls", help="list runs, or the steps of a run",
        description="Without RUN: every run and rank with its step count and sizes. With RUN: "
        "each step of each rank (base or delta, its parent, raw and stored size, ratio).",
    )
    parser.add_argument("run", nargs="?", metavar="RUN")
    parser.add_argument("--rank", type=int, metavar="R", help="only this rank of RUN")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--quarantined", action="store_true",
        help="list the quarantined step directories instead (and the damaged ones a "
        "daemon's next start will quarantine); needs --storage")
    add_source_arguments(parser)
    parser.set_defaults(handler=run_command(_ls))


def _ls(catalog: Catalog, args: argparse.Namespace) -> int:
    if args.quarantined:
        return _ls_quarantined(catalog, args)
    if args.run is None:
        return _ls_runs(catalog, args.json)
    chains = {rank: catalog.list_steps(args.run, rank)
              for rank in ranks_of(catalog, args.run, args.rank)}
    if args.json:
        print(json.dumps({"run": args.run, "ranks": {
            str(rank): [dict(asdict(s), compression_ratio=s.compression_ratio) for s in steps]
            for rank, steps in chains.items()}}, indent=2))
        return 0
    # The WORLD column only for runs saved with a world, so other listings read as before.
    worlds = any(s.world_size for steps in chains.values() for s in steps)
    rows = [
        (rank, s.step, s.kind, "-" if s.parent_step is None else s.parent_step, s.chain_depth,
         format_bytes(s.raw_bytes), format_bytes(s.stored_bytes),
         format_ratio(s.raw_bytes, s.stored_bytes), format_metrics(s.metrics))
        + ((format_world(s.world_size, s.missing_ranks),) if worlds else ())
        for rank, steps in chains.items() for s in steps
    ]
    print(format_table(("RANK", "STEP", "KIND", "PARENT", "DEPTH", "RAW", "STORED", "RATIO",
                        "METRICS") + (("WORLD",) if worlds else ()), rows))
    return 0


def _ls_quarantined(catalog: Catalog, args: argparse.Namespace) -> int:
    """Rows of the quarantine area (WHERE its directory) and of damaged directories still
    under ``runs/`` (WHERE "runs/ (quarantined at next start)")."""
    rows: list[tuple[StepKey, str, int, int | None, str]] = [
        (e.key, e.prefix, len(e.keys), e.stored_bytes, e.reason)
            for e in quarantined_entries(catalog, args.run, args.rank, None)]
    rows += [(d.key, "runs/ (quarantined at next daemon start)", len(d.keys), None, d.reason)
             for d in catalog.damaged()
             if args.run in (None, d.key.run) and args.rank in (None, d.key.rank)]
    if args.json:
        print(json.dumps([{"run": key.run, "rank": key.rank, "step": key.step, "where": where,
                           "keys": keys, "stored_bytes": stored, "reason": reason}
                          for key, where, keys, stored, reason in rows], indent=2))
        return 0
    if not rows:
        print(f"nothing quarantined in {catalog.location}", file=sys.stderr)
        return 0
    print(format_table(("RUN", "RANK", "STEP", "WHERE", "KEYS", "STORED", "REASON"), [
        (key.run, key.rank, key.step, where, keys,
         "-" if stored is None else format_bytes(stored), reason)
        for key, where, keys, stored, reason in rows]))
    return 0


def quarantined_entries(
    catalog: Catalog, run: str | None, rank: int | None, step: int | None
) -> list[QuarantinedStep]:
    """The quarantined step directories matching the filters (None matches any)."""
    return [e for e in catalog.quarantined()
            if run in (None, e.key.run) and rank in (None, e.key.rank)
            and step in (None, e.key.step)]


def _ls_runs(catalog: Catalog, as_json: bool) -> int:
    runs = catalog.list_runs()
    raw = {(r.run, r.rank): sum(s.raw_bytes for s in catalog.list_steps(r.run, r.rank))
           for r in runs}
    if as_json:
        print(json.dumps([dict(asdict(r), raw_bytes=raw[(r.run, r.rank)]) for r in runs],
                         indent=2))
        return 0
    if not runs:
        print(f"no runs in {catalog.location}", file=sys.stderr)
        return 0
    # RAW and RATIO are of the listed steps; STORED is every byte, HIDDEN's included.
    rows = [(r.run, r.rank, r.step_count, r.latest_step, format_bytes(raw[(r.run, r.rank)]),
             format_bytes(r.stored_bytes), format_ratio(raw[(r.run, r.rank)], r.stored_bytes),
             f"{format_bytes(r.hidden_bytes)} ({r.hidden_steps})" if r.hidden_steps else "-",
             r.retention.describe() if r.retention else "keep all")
            for r in runs]
    print(format_table(("RUN", "RANK", "STEPS", "LATEST", "RAW", "STORED", "RATIO",
                        "HIDDEN", "RETENTION"), rows))
    return 0


# -- info -----------------------------------------------------------------------------------


def register_info(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info", help="the daemon or storage, or one step's tensor table",
        description="Without RUN: the daemon's settings (or the storage URL) and totals. "
        "With RUN: one step (--step, default the latest) and its tensor table.",
    )
    parser.add_argument("run", nargs="?", metavar="RUN")
    parser.add_argument("--step", type=int, metavar="N", help="default: the latest step")
    parser.add_argument("--rank", type=int, default=0, metavar="R", help="default 0")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_source_arguments(parser)
    parser.set_defaults(handler=run_command(_info))


def _info(catalog: Catalog, args: argparse.Namespace) -> int:
    if args.run is None:
        return _info_source(catalog, args.json)
    info = resolve_step(catalog, args.run, args.rank, args.step)
    key = StepKey(args.run, args.rank, info.step)
    detail = catalog.step_detail(key)
    retention = next((r.retention for r in catalog.list_runs()
                      if r.run == key.run and r.rank == key.rank), None)
    if args.json:
        tensors = [dict(asdict(row.spec), policy=row.spec.policy.value, encoding=row.encoding,
                        stored_bytes=row.stored_bytes, raw_bytes=row.spec.nbytes)
                   for row in detail.tensors]
        print(json.dumps({"step": dict(asdict(info), run=key.run, rank=key.rank),
                          "retention": asdict(retention) if retention else None,
                          "checksum": detail.checksum, "metadata": detail.metadata,
                          "tensors": tensors}, indent=2))
        return 0
    parent = "" if info.parent_step is None else f" of step {info.parent_step}"
    print(f"step      {key}\nkind      {info.kind}{parent} (depth {info.chain_depth})\n"
          f"size      {format_bytes(info.raw_bytes)} raw, {format_bytes(info.stored_bytes)} "
          f"stored ({format_ratio(info.raw_bytes, info.stored_bytes)})\n"
          f"checksum  {detail.checksum}\n"
          f"metrics   {format_metrics(info.metrics)}\n"
          f"retention {retention.describe() if retention else 'keep all'} (run {key.run})")
    for name, value in sorted(detail.metadata.items()):
        shown = value if len(value) <= 60 else f"<{len(value)} characters>"
        print(f"metadata  {name} = {shown}")
    rows = [(r.spec.name, r.spec.dtype, list(r.spec.shape), r.spec.policy.value,
             r.encoding or "-", format_bytes(r.spec.nbytes),
             "-" if r.stored_bytes is None else format_bytes(r.stored_bytes),
             "-" if r.stored_bytes is None else format_ratio(r.spec.nbytes, r.stored_bytes))
            for r in detail.tensors]
    print(format_table(("TENSOR", "DTYPE", "SHAPE", "POLICY", "ENCODING", "RAW", "STORED",
                        "RATIO"), rows))
    return 0


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``name=value`` pairs, sorted by name ("-" for none)."""
    return " ".join(f"{name}={value:.6g}" for name, value in sorted(metrics.items())) or "-"


def _info_source(catalog: Catalog, as_json: bool) -> int:
    fields = catalog.describe()
    runs: list[RunInfo] = catalog.list_runs()
    fields += [("runs", str(len({r.run for r in runs}))), ("chains", str(len(runs))),
               ("steps", str(sum(r.step_count for r in runs))),
               ("stored_bytes", str(sum(r.stored_bytes for r in runs))),
               ("hidden_bytes", str(sum(r.hidden_bytes for r in runs)))]
    # What a Python client adds per tensor, so the defaults a trainer gets read in one place.
    fields += describe_builtin()
    if as_json:
        print(json.dumps(dict(fields), indent=2))
        return 0
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        shown = format_bytes(int(value)) if name.endswith("_bytes") else value
        print(f"{name.ljust(width)}  {shown}")
    return 0
