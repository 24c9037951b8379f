"""``ckptd export``, ``verify`` and ``rm``: the commands that restore or change checkpoints.

They share ``cli_commands``' source arguments and error mapping. ``rm`` asks before it
deletes unless ``--yes``; without a terminal to ask on (CI, pipes) it refuses instead.
Deleting with ``--storage`` while a daemon serves the same storage corrupts the daemon's
view of it (see ``ckptd.daemon.cli.storage_catalog``): delete through the daemon instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptd.client.errors import CkptdClientError, CkptdTimeoutError, DaemonUnavailableError
from ckptd.daemon.cli import export as exporter
from ckptd.daemon.cli.catalog import Catalog
from ckptd.daemon.cli.commands import (
    add_source_arguments,
    one_line,
    ranks_of,
    resolve_step,
    run_command,
)
from ckptd.daemon.cli.output import Progress, format_bytes
from ckptd.daemon.domain import StepKey
from ckptd.daemon.errors import CkptdError, CorruptCheckpointError, InvalidRequestError
from ckptd.daemon.store.manifest import tensors_checksum

# -- export ---------------------------------------------------------------------------------


def register_export(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export", help="write one step as .safetensors or .pt",
        description="Restore one step and write it as a file that loads without ckptd: "
        ".safetensors (flat tensor names as saved; safetensors.torch.load_file) or .pt "
        "(the nested state Checkpointer.restore() returns; torch.load, needs PyTorch).",
    )
    parser.add_argument("run", metavar="RUN")
    parser.add_argument("--step", type=int, metavar="N", help="default: the latest step")
    parser.add_argument("--rank", type=int, default=0, metavar="R", help="default 0")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="FILE",
                        help="FILE.safetensors or FILE.pt; replaced atomically if it exists")
    add_source_arguments(parser)
    parser.set_defaults(handler=run_command(_export))


def _export(catalog: Catalog, args: argparse.Namespace) -> int:
    fmt = exporter.format_for(args.output)  # a bad suffix fails before any restore
    info = resolve_step(catalog, args.run, args.rank, args.step)
    key = StepKey(args.run, args.rank, info.step)
    with Progress(f"restoring {key}", info.raw_bytes, sys.stderr) as progress:
        checkpoint = catalog.restore(key, progress.advance)
    with Progress(f"writing {args.output.name}", info.raw_bytes, sys.stderr) as progress:
        exporter.export(checkpoint, args.output, progress.advance)
    print(f"exported {key} ({len(checkpoint.tensors)} tensors, "
          f"{format_bytes(info.raw_bytes)}) to {args.output} ({fmt})")
    return 0


# -- verify ---------------------------------------------------------------------------------


def register_verify(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify", help="restore steps and check every checksum",
        description="Restore every step of RUN (or of every run) and check each blob's and "
        "each step's checksum. Reports every failure; exits 1 if any step fails. A daemon "
        "serves each chain's newest step from memory; --storage reads every step's blobs.",
    )
    parser.add_argument("run", nargs="?", metavar="RUN", help="default: every run")
    parser.add_argument("--rank", type=int, metavar="R", help="only this rank of RUN")
    parser.add_argument("--step", type=int, metavar="N", help="only this step (needs RUN)")
    add_source_arguments(parser)
    parser.set_defaults(handler=run_command(_verify))


def _verify(catalog: Catalog, args: argparse.Namespace) -> int:
    keys = _keys_to_verify(catalog, args)
    failures = 0
    with Progress("verifying", len(keys), sys.stderr, unit="steps") as progress:
        for key in keys:
            progress.set_label(f"verifying {key}")
            problem = _verify_step(catalog, key)
            if problem:
                failures += 1
                progress.close()
                print(f"FAILED {key}: {problem}", flush=True)
            progress.advance()
    chains = len({(key.run, key.rank) for key in keys})
    verdict = f"{failures} failed" if failures else "all checksums match"
    print(f"verified {len(keys)} steps of {chains} chains in {catalog.location}: {verdict}")
    return 1 if failures else 0


def _keys_to_verify(catalog: Catalog, args: argparse.Namespace) -> list[StepKey]:
    if args.run is None:
        if args.rank is not None or args.step is not None:
            raise InvalidRequestError("--rank and --step need RUN")
        chains = [(info.run, info.rank) for info in catalog.list_runs()]
    else:
        chains = [(args.run, rank) for rank in ranks_of(catalog, args.run, args.rank)]
    if args.step is not None:
        return [StepKey(run, rank, resolve_step(catalog, run, rank, args.step).step)
                for run, rank in chains]
    return [StepKey(run, rank, info.step)
            for run, rank in chains for info in catalog.list_steps(run, rank)]


def _verify_step(catalog: Catalog, key: StepKey) -> str:
    """Restores ``key`` and checks it again here; returns the problem, or "" if none.

    A lost daemon (unreachable, timed out) ends the whole run: it says nothing about this
    step, and every later step would fail the same way.
    """
    try:
        restored = catalog.restore(key)
        actual = tensors_checksum(restored.tensors, restored.arrays)
        if actual != restored.checksum:
            raise CorruptCheckpointError(
                f"reconstructs to checksum {actual}, manifest records {restored.checksum}")
    except (CkptdError, CkptdClientError) as exc:
        if isinstance(exc, DaemonUnavailableError | CkptdTimeoutError):
            raise  # a lost daemon ends the whole run
        return f"{type(exc).__name__}: {one_line(exc)}"
    return ""


# -- rm -------------------------------------------------------------------------------------


def register_rm(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rm", help="delete a step, a rank's steps, or a whole run",
        description="Delete one step (--step; a later step that depends on it is first "
        "rewritten as a lossless base, so it stays restorable), every step of one rank "
        "(--rank), or every rank of RUN. Asks first unless --yes. With --storage, make sure "
        "no daemon serves that storage: it would not notice the deletion.",
    )
    parser.add_argument("run", metavar="RUN")
    parser.add_argument("--step", type=int, metavar="N", help="only this step")
    parser.add_argument("--rank", type=int, metavar="R",
                        help="only this rank (default 0 with --step; every rank without)")
    parser.add_argument("-y", "--yes", action="store_true",
                        help="do not ask (required without a terminal, e.g. in CI)")
    add_source_arguments(parser)
    parser.set_defaults(handler=_rm_handler)


def _rm_handler(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    args.ci = environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return run_command(_rm)(args, environ)


def _rm(catalog: Catalog, args: argparse.Namespace) -> int:
    if args.step is not None:
        rank = 0 if args.rank is None else args.rank
        keys = [StepKey(args.run, rank, resolve_step(catalog, args.run, rank, args.step).step)]
        what, detail = f"step {keys[0]}", ""
    else:
        ranks = ranks_of(catalog, args.run, args.rank)
        # Newest first: the newest step never has a dependant, so nothing is rebased.
        keys = [StepKey(args.run, rank, info.step) for rank in ranks
                for info in reversed(catalog.list_steps(args.run, rank))]
        scope = f"rank {args.rank} of run" if args.rank is not None else "run"
        what, detail = f"{scope} {args.run!r}", f" ({len(keys)} steps, ranks {ranks})"
    where = catalog.location
    if catalog.direct:
        where += " (directly: no daemon may be serving this storage)"
    if not args.yes and not _confirm(f"delete {what}{detail} from {where}?", args.ci):
        print("ckptd: nothing deleted", file=sys.stderr)
        return 1
    if args.step is not None or args.rank is not None:
        deleted = sum(catalog.delete_step(key) for key in keys)
    else:
        deleted = catalog.delete_run(args.run)
    print(f"deleted {what}: {deleted} steps")
    return 0


def _confirm(question: str, ci: bool) -> bool:
    if ci or not sys.stdin.isatty():
        raise InvalidRequestError(
            f"refusing to {question.rstrip('?')} without --yes: no terminal to ask on"
            + (" (CI is set)" if ci else ""))
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")
