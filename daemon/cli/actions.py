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
    quarantined_entries,
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
        "serves each chain's newest step from memory; --storage reads every step's blobs "
        "and also reports (and fails on) quarantined and damaged step directories.",
    )
    parser.add_argument("run", nargs="?", metavar="RUN", help="default: every run")
    parser.add_argument("--rank", type=int, metavar="R", help="only this rank of RUN")
    parser.add_argument("--step", type=int, metavar="N", help="only this step (needs RUN)")
    add_source_arguments(parser)
    parser.set_defaults(handler=run_command(_verify))


def _verify(catalog: Catalog, args: argparse.Namespace) -> int:
    failures = _report_quarantine(catalog, args)
    try:
        keys = _keys_to_verify(catalog, args)
    except LookupError:
        if not failures:
            raise
        keys = []  # every step of RUN is quarantined: reported above
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
    if not catalog.direct:
        print("note: quarantined steps are not checked through a daemon; run `ckptd verify "
              "--storage` (or `ckptd ls --quarantined --storage`)", file=sys.stderr)
    return 1 if failures else 0


def _report_quarantine(catalog: Catalog, args: argparse.Namespace) -> int:
    """Prints a FAILED line per quarantined or damaged step directory in scope; returns
    how many. Over a daemon (no quarantine call in the wire API) it checks nothing."""
    if not catalog.direct:
        return 0
    found = [(e.key, f"quarantined in {e.prefix}: {e.reason}")
             for e in quarantined_entries(catalog, args.run, args.rank, args.step)]
    found += [(d.key, f"damaged, quarantined at the next daemon start: {d.reason}")
              for d in catalog.damaged()
              if args.run in (None, d.key.run) and args.rank in (None, d.key.rank)
              and args.step in (None, d.key.step)]
    for key, problem in found:
        print(f"FAILED {key}: {problem}", flush=True)
    return len(found)


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
        "(--rank), or every rank of RUN; or quarantined step directories (--quarantined). "
        "Asks first unless --yes. With --storage, make sure no daemon serves that storage: it "
        "would not notice the deletion (the storage lock refuses while one runs). On S3 each "
        "chain's writer lease is taken instead (refused while a daemon writes the chain) and "
        "renewed while the deletion runs; one that loses it stops and says what was deleted.",
    )
    parser.add_argument("run", nargs="?", metavar="RUN",
                        help="required, except with --quarantined (default: every run)")
    parser.add_argument("--step", type=int, metavar="N", help="only this step")
    parser.add_argument(
        "--with-dependants", action="store_true",
        help="with --step: also delete the later deltas that depend on it, newest first, so "
        "that nothing is rewritten (the way to free space on a full disk)")
    parser.add_argument(
        "--quarantined", action="store_true",
        help="delete quarantined step directories (of RUN, --rank, --step if given) for "
        "good; needs --storage")
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
    if args.quarantined:
        return _rm_quarantined(catalog, args)
    if args.run is None:
        raise InvalidRequestError("name the RUN to delete from (or pass --quarantined)")
    if args.with_dependants and args.step is None:
        raise InvalidRequestError("--with-dependants needs --step")
    if args.step is not None:
        rank = 0 if args.rank is None else args.rank
        info = resolve_step(catalog, args.run, rank, args.step)
        keys = [StepKey(args.run, rank, step)
                for step in reversed(_with_dependants(catalog, args.run, rank, info.step,
                                                      args.with_dependants))]
        what = f"step {keys[-1]}"
        detail = f" and the {len(keys) - 1} steps that depend on it" if len(keys) > 1 else ""
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
        deleted = _delete_steps(catalog, keys)
    else:
        deleted = catalog.delete_run(args.run)
    print(f"deleted {what}: {deleted} steps")
    return 0


def _delete_steps(catalog: Catalog, keys: list[StepKey]) -> int:
    """Deletes ``keys`` in order; when one fails (a lost lease, a full disk), says on stderr
    which were deleted before the error (the error itself says the failed one was not)."""
    done: list[StepKey] = []
    try:
        for key in keys:
            catalog.delete_step(key)
            done.append(key)
    except BaseException:
        if done:
            print(f"ckptd: deleted {len(done)} of {len(keys)} steps before the error: "
                  + ", ".join(map(str, done)), file=sys.stderr)
        raise
    return len(done)


def _with_dependants(catalog: Catalog, run: str, rank: int, step: int, wanted: bool) -> list[int]:
    """``step``, then (when ``wanted``) each later delta whose chain runs through it, up to
    the next base; deleting them newest first rewrites nothing."""
    steps = [step]
    if wanted:
        for info in catalog.list_steps(run, rank):
            if info.parent_step is not None and info.parent_step == steps[-1]:
                steps.append(info.step)
    return steps


def _rm_quarantined(catalog: Catalog, args: argparse.Namespace) -> int:
    entries = quarantined_entries(catalog, args.run, args.rank, args.step)
    if not entries:
        print(f"nothing quarantined matches in {catalog.location}", file=sys.stderr)
        return 0
    listing = ", ".join(f"{e.key} ({e.reason})" for e in entries[:5])
    listing += f" and {len(entries) - 5} more" if len(entries) > 5 else ""
    question = (f"delete {len(entries)} quarantined step directories from {catalog.location} "
                f"for good: {listing}?")
    if not args.yes and not _confirm(question, args.ci):
        print("ckptd: nothing deleted", file=sys.stderr)
        return 1
    catalog.delete_quarantined(entries)
    print(f"deleted {len(entries)} quarantined step directories: "
          + ", ".join(f"{e.key} from {e.prefix}" for e in entries))
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
