"""Retention benchmark: the footprint of a long run under ``keep_last=5, keep_every=100``
against the same run's torch.save files under the same policy, and what retention costs.

A real (small) training run: an MLP on scikit-learn's bundled digits trained with AdamW,
one optimizer step per save, so every delta is a real update of the weights and of both
Adam moments. ``--saves`` saves (steps 1..N) go through a ``ckptd serve`` subprocess on a
unix socket with ``Retention(keep_last=5, keep_every=100)``; each step is also written with
``torch.save`` to a temporary directory, and the files the same policy drops are deleted as
the run goes (the torch.save footprint is measured on disk at the end, not estimated).
Each save waits for DURABLE before the next training step (save→durable latency).

At the end, once the daemon's retention is idle: bytes of every file under the ckptd
storage directory (hidden steps included: dropped steps a kept delta still restores
through) versus the kept torch.save files; the listed steps (they must be exactly the
policy's); every kept step restored and compared with what was saved (integer and
exactly-encoded tensors bit for bit, lossy ones by their largest error); retention's cost
from the metrics endpoint (``ckptd_retention_seconds_total``, rewrites included, over
durable saves; removed steps) plus the rewrites its log reports (a kept delta rewritten as
a base: how many, their time, the bytes they wrote). A second run with the same seed and
no retention gives the save→durable latency without retention, the store's footprint
without it (what the saves wrote), and a reference: every kept step of the first run must
restore bit-identical to the same step of this one.

Usage (from the repository root)::

    .venv/bin/python bench/retention.py [--saves 1000 --width 256] [--out bench/out/retention.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ckptd.client import Checkpointer, Retention
from sklearn.datasets import load_digits
from torch import nn

OUT_PATH = Path(__file__).resolve().parent / "out" / "retention.json"
RUN = "mlp"
MB = 1_000_000


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    address: str
    metrics_address: str
    storage: Path
    log_path: Path

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of the daemon's Prometheus endpoint (0 when absent)."""
        url = f"http://{self.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0


@contextlib.contextmanager
def daemon(workdir: Path) -> Iterator[Daemon]:
    """A ``ckptd serve`` subprocess on a unix socket, storing under ``workdir/store``, its
    metrics on 127.0.0.1 and info-level logs (retention's deletions and rebases)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    log_path = workdir / "daemon.log"
    command = [
        sys.executable, "-m", "ckptd.daemon.cli", "serve", "--storage", str(workdir / "store"),
        "--listen", f"unix://{workdir / 'd.sock'}", "--ready-file", str(ready),
        "--metrics-listen", "127.0.0.1:0", "--log-level", "info",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        yield Daemon(proc, info["address"], info["metrics_address"], workdir / "store",
                     log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree_bytes(root: Path) -> tuple[int, int]:
    """Bytes and number of every regular file under ``root``."""
    total = files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
                files += 1
    return total, files


def policy_keeps(steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """The steps ``Retention(keep_last, keep_every)`` keeps of ``steps`` (ascending)."""
    kept = set(steps[-keep_last:]) | {s for s in steps if s % keep_every == 0}
    return sorted(kept)


class Trainer:
    """An MLP (64→width→width→10) on the digits, AdamW, batch 64; seeded, deterministic."""

    def __init__(self, width: int, seed: int) -> None:
        digits = load_digits()
        self.x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
        self.y = torch.tensor(digits.target, dtype=torch.long)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                                   nn.ReLU(), nn.Linear(width, 10))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        self.rng = np.random.default_rng(seed)
        self.loss = float("nan")

    def step(self) -> None:
        rows = torch.from_numpy(self.rng.choice(len(self.x), 64, replace=False))
        loss = nn.functional.cross_entropy(self.model(self.x[rows]), self.y[rows])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.loss = float(loss.detach())

    def state(self, step: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(),
                "step": step}


def flat_tensors(state: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Every tensor/array of a nested state, by path, as numpy copies."""
    out: dict[str, np.ndarray] = {}
    if isinstance(state, torch.Tensor):
        out[prefix] = state.detach().cpu().numpy().copy()
    elif isinstance(state, np.ndarray):
        out[prefix] = state.copy()
    elif isinstance(state, dict):
        for key, value in state.items():
            out.update(flat_tensors(value, f"{prefix}/{key}"))
    elif isinstance(state, list | tuple):
        for index, value in enumerate(state):
            out.update(flat_tensors(value, f"{prefix}/{index}"))
    return out


def compare(saved: dict[str, np.ndarray], restored: dict[str, np.ndarray]) -> dict[str, Any]:
    """Tensors equal bit for bit, the others' largest absolute error and its scale."""
    if saved.keys() != restored.keys():
        return {"same_tensors": False, "missing": sorted(saved.keys() ^ restored.keys())}
    exact, lossy, worst, worst_rel = 0, 0, 0.0, 0.0
    for name, want in saved.items():
        got = restored[name]
        if want.shape != got.shape or want.dtype != got.dtype:
            return {"same_tensors": False, "mismatch": name}
        if want.tobytes() == got.tobytes():
            exact += 1
            continue
        lossy += 1
        err = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64))))
        scale = float(np.max(np.abs(want))) or 1.0
        worst, worst_rel = max(worst, err), max(worst_rel, err / scale)
    return {"same_tensors": True, "bit_identical": exact, "lossy": lossy,
            "max_abs_err": worst, "max_err_over_max_abs": worst_rel}


def identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def wait_retention(daemon: Daemon, ckpt: Checkpointer,
                   timeout_s: float = 60.0) -> tuple[list[int], float]:
    """Polls the run's steps until neither they nor the deletion counter changed for a
    second; returns the steps and how long that took after the last save was durable."""
    started = time.perf_counter()
    seen: list[tuple[list[int], float]] = []
    steps = ckpt.steps()
    while time.perf_counter() - started < timeout_s:
        steps = ckpt.steps()
        seen.append((steps, daemon.metric("ckptd_retention_deleted_steps_total")))
        if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
            break
        time.sleep(0.5)
    return steps, time.perf_counter() - started


def rebases(log_path: Path) -> tuple[int, float, list[int], int]:
    """Rewrites retention logged: how many, their seconds, the steps rewritten, the bytes
    they wrote (the rewritten bases' stored bytes)."""
    count, seconds, steps, written = 0, 0.0, [], 0
    for line in log_path.read_text(errors="replace").splitlines():
        if "rebased step" in line:
            if match := re.search(r"stored_bytes[\"=: ]+([0-9]+)", line):
                written += int(match.group(1))
            continue
        if "retention rewrote" not in line:
            continue
        count += 1
        if match := re.search(r"seconds[\"=: ]+([0-9.e+-]+)", line):
            seconds += float(match.group(1))
        if match := re.search(r"steps[\"=: ]+\[([0-9]+)\]", line):
            steps.append(int(match.group(1)))
    return count, seconds, steps, written


ACTIONS = {"deleted": "retention deleted steps", "hidden": "retention removed steps",
           "rewritten": "retention rewrote"}


def actions(log_path: Path) -> dict[str, dict[str, float]]:
    """Retention's actions from its log, by kind: how many and their lock seconds."""
    found = {kind: {"count": 0, "seconds": 0.0} for kind in ACTIONS}
    for line in log_path.read_text(errors="replace").splitlines():
        for kind, text in ACTIONS.items():
            if text in line and (match := re.search(r"seconds[\"=: ]+([0-9.e+-]+)", line)):
                found[kind]["count"] += 1
                found[kind]["seconds"] += float(match.group(1))
    return found


def hidden_on_disk(storage: Path) -> tuple[int, int]:
    """Steps retention hid (their ``hidden`` marker) and the bytes of their directories."""
    dirs = [marker.parent for marker in storage.glob("runs/*/*/*/hidden")]
    return len(dirs), sum(tree_bytes(d)[0] for d in dirs)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_ms": 1e3 * statistics.median(ordered),
            "p90_ms": 1e3 * ordered[int(0.9 * (len(ordered) - 1))],
            "p99_ms": 1e3 * ordered[int(0.99 * (len(ordered) - 1))],
            "max_ms": 1e3 * ordered[-1], "mean_ms": 1e3 * statistics.fmean(ordered)}


def one_run(workdir: Path, args: argparse.Namespace, retention: Retention | None,
            expected: list[int], restore_steps: list[int] | None = None) -> dict[str, Any]:
    """Trains and saves ``args.saves`` steps through a daemon storing in ``workdir``.
    With retention, also keeps torch.save files under the same policy."""
    trainer = Trainer(args.width, args.seed)
    remember = set(expected)
    saved: dict[int, dict[str, np.ndarray]] = {}
    stalls, latencies, torch_sizes = [], [], []
    torch_dir = workdir / "torch"
    torch_dir.mkdir(parents=True)
    torch_files: list[int] = []
    result: dict[str, Any] = {"retention": retention is not None}
    with daemon(workdir) as d:
        with Checkpointer(d.address, run=RUN, retention=retention) as ckpt:
            result["transport"] = ckpt.transport
            started = time.perf_counter()
            for step in range(1, args.saves + 1):
                trainer.step()
                state = trainer.state(step)
                began = time.perf_counter()
                handle = ckpt.save(step, state, metrics={"train_loss": trainer.loss})
                stalls.append(time.perf_counter() - began)
                handle.wait_durable(timeout=600)
                latencies.append(time.perf_counter() - began)
                if step in remember:
                    saved[step] = flat_tensors(state)
                if retention is not None:  # the same policy over torch.save files
                    path = torch_dir / f"step-{step:06d}.pt"
                    torch.save(state, path)
                    torch_sizes.append(path.stat().st_size)
                    torch_files.append(step)
                    keep = set(policy_keeps(torch_files, args.keep_last, args.keep_every))
                    for old in [s for s in torch_files if s not in keep]:
                        (torch_dir / f"step-{old:06d}.pt").unlink()
                    torch_files = sorted(keep)
            loop_s = time.perf_counter() - started
            steps, settle_s = wait_retention(d, ckpt)
            store_bytes, store_files = tree_bytes(d.storage)
            hidden_steps, hidden_bytes = hidden_on_disk(d.storage)
            durable = d.metric("ckptd_saves_total", '{outcome="durable"}')
            retention_s = d.metric("ckptd_retention_seconds_total")
            deleted = d.metric("ckptd_retention_deleted_steps_total")
            restored: dict[int, dict[str, np.ndarray]] = {}
            checks: dict[int, dict[str, Any]] = {}
            for step in steps if restore_steps is None else restore_steps:
                restored[step] = flat_tensors(ckpt.restore(step))
                if step in saved:  # the policy's steps
                    checks[step] = compare(saved[step], restored[step])
            result["steps_listed"] = steps
        rebase_count, rebase_s, rebase_steps, rebase_bytes = rebases(d.log_path)
        result["retention_actions"] = actions(d.log_path)
    torch_bytes, _ = tree_bytes(torch_dir)
    result.update({
        "loop_s": loop_s, "settle_s": settle_s, "final_train_loss": trainer.loss,
        "state_bytes": sum(a.nbytes for a in saved[expected[-1]].values()),
        "stall": percentiles(stalls), "save_to_durable": percentiles(latencies),
        "latency_ms_by_step": [round(1e3 * x, 3) for x in latencies],
        "store_bytes": store_bytes, "store_files": store_files,
        "hidden_steps": hidden_steps, "hidden_bytes": hidden_bytes,
        "durable_saves": durable, "retention_seconds_total": retention_s,
        "retention_deleted_steps_total": deleted, "rebases": rebase_count,
        "rebase_seconds": rebase_s, "rebased_steps": rebase_steps,
        "rebase_bytes_written": rebase_bytes,
        "restore_checks": {str(k): v for k, v in checks.items()},
    })
    if retention is not None:
        result.update({"torch_save_kept_bytes": torch_bytes, "torch_save_kept_steps": torch_files,
                       "torch_save_file_bytes_median": int(statistics.median(torch_sizes)),
                       "torch_save_all_bytes": sum(torch_sizes)})
    result["_restored"] = restored
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=1000)
    parser.add_argument("--width", type=int, default=256, help="MLP hidden width")
    parser.add_argument("--keep-last", type=int, default=5)
    parser.add_argument("--keep-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = Retention(keep_last=args.keep_last, keep_every=args.keep_every)
    expected = policy_keeps(list(range(1, args.saves + 1)), args.keep_last, args.keep_every)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-retention-") as tmp:
        with_ret = one_run(Path(tmp) / "with", args, policy, expected)
        shutil.rmtree(Path(tmp) / "with")
        without = one_run(Path(tmp) / "without", args, None, expected,
                          restore_steps=with_ret["steps_listed"])
    same = {str(s): identical(with_ret["_restored"][s], without["_restored"][s])
            for s in with_ret["steps_listed"]}
    del with_ret["_restored"], without["_restored"]
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg": os.getloadavg()},
        "config": {"saves": args.saves, "width": args.width, "seed": args.seed,
                   "keep_last": args.keep_last, "keep_every": args.keep_every,
                   "threads": args.threads},
        "expected_kept": expected, "with_retention": with_ret, "without_retention": without,
        "kept_identical_to_run_without_retention": same, "elapsed_s": time.perf_counter() - began,
    }
    ok = (with_ret["steps_listed"] == expected
          and with_ret["torch_save_kept_steps"] == expected
          and all(c.get("same_tensors") for c in with_ret["restore_checks"].values())
          and all(same.values()))
    results["ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    return 0 if ok else 1


def print_summary(results: dict[str, Any]) -> None:
    w, wo, cfg = results["with_retention"], results["without_retention"], results["config"]
    commits = w["durable_saves"] or cfg["saves"]
    checks = w["restore_checks"].values()
    print(f"{cfg['saves']} saves of a {w['state_bytes'] / MB:.2f} MB state (MLP width "
          f"{cfg['width']} + AdamW), Retention(keep_last={cfg['keep_last']}, "
          f"keep_every={cfg['keep_every']}), transport {w['transport']}, "
          f"{results['elapsed_s']:.0f} s in all")
    print("| measure | value |")
    print("| --- | --- |")
    exact = "exactly the policy's" if w["steps_listed"] == results["expected_kept"] else (
        f"the policy's are {results['expected_kept']}")
    print(f"| steps listed | {len(w['steps_listed'])}: {w['steps_listed']}; {exact} "
          f"(settled {w['settle_s']:.1f} s after the last save) |")
    print(f"| ckptd store on disk (all files) | {w['store_bytes'] / MB:.2f} MB "
          f"({w['store_files']} files), of which hidden (steps a kept one restores "
          f"through) {w['hidden_bytes'] / MB:.2f} MB ({w['hidden_steps']} steps) |")
    print(f"| torch.save files kept by the same policy (on disk) | "
          f"{w['torch_save_kept_bytes'] / MB:.2f} MB ({len(w['torch_save_kept_steps'])} files "
          f"of {w['torch_save_file_bytes_median'] / MB:.2f} MB) |")
    print(f"| footprint ckptd / torch.save | {w['store_bytes'] / w['torch_save_kept_bytes']:.3f} |")
    print(f"| without retention: ckptd store / all torch.save files | "
          f"{wo['store_bytes'] / MB:.1f} MB / {w['torch_save_all_bytes'] / MB:.0f} MB |")
    print(f"| restores of kept steps | all {len(w['steps_listed'])} restored; the policy's "
          f"{sum(c.get('same_tensors', False) for c in checks)}/{len(w['restore_checks'])} "
          f"match what was saved; bit-identical to the run without retention: "
          f"{sum(results['kept_identical_to_run_without_retention'].values())}/"
          f"{len(w['steps_listed'])}; per step {max(c.get('bit_identical', 0) for c in checks)} "
          f"tensors exact, {max(c.get('lossy', 0) for c in checks)} lossy (max err / max |x| "
          f"{max(c.get('max_err_over_max_abs', 0.0) for c in checks):.2e}) |")
    print(f"| retention removed steps (deleted or hidden) | "
          f"{w['retention_deleted_steps_total']:.0f}; rewrites {w['rebases']} "
          f"({w['rebases'] / commits:.3f} per commit) writing {w['rebase_bytes_written'] / MB:.2f}"
          f" MB ({w['rebase_bytes_written'] / wo['store_bytes']:.3f} of what the saves wrote) |")
    print(f"| retention lock time per commit (`ckptd_retention_seconds_total` / commits) | "
          f"{1e3 * w['retention_seconds_total'] / commits:.3f} ms "
          f"({w['retention_seconds_total']:.3f} s / {commits:.0f}) |")
    acts = w["retention_actions"]
    print("| of which, per commit (from the log) | " + ", ".join(
        f"{kind} {1e3 * a['seconds'] / commits:.3f} ms ({a['count']} actions)"
        for kind, a in acts.items()) + " |")
    for name, run in (("with", w), ("without", wo)):
        lat, stall = run["save_to_durable"], run["stall"]
        print(f"| save→durable {name} retention, p50 / p90 / p99 / max | {lat['p50_ms']:.1f} / "
              f"{lat['p90_ms']:.1f} / {lat['p99_ms']:.1f} / {lat['max_ms']:.1f} ms "
              f"(stall in save p50 {stall['p50_ms']:.2f} ms) |")


if __name__ == "__main__":
    sys.exit(main())
