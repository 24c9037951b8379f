"""The README says what the code does: its test command is CI's, its settings table is the
daemon's settings, with their real defaults.

Docs drift silently; these checks make a renamed flag or a changed default fail here.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptd.daemon.config import SETTINGS, DaemonConfig, env_name, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# | `--flag` | `CKPTD_FLAG` | default | meaning |
_ROW = re.compile(r"^\| `--([a-z-]+)` \| `(CKPTD_[A-Z_]+)` \| ([^|]+) \|", re.MULTILINE)


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci_command}\n```" in README


def test_settings_table_lists_every_setting_with_its_default() -> None:
    rows = {flag.replace("-", "_"): (env, default.strip()) for flag, env, default in
            _ROW.findall(README)}
    config = DaemonConfig(storage_url="unused")
    for name, (which, field, parser) in SETTINGS.items():
        assert name in rows, f"README settings table lacks --{name.replace('_', '-')}"
        env, shown = rows[name]
        assert env == env_name(name)
        default = getattr(config if which == "daemon" else config.engine, field)
        if name == "storage" or default == "":
            assert shown.startswith("("), (name, shown)  # "(required)" / "(none)"
            continue
        value = shown.strip("`")
        parsed = parse_bytes(value) if parser is parse_bytes else parser(value)
        assert parsed == default, f"README says --{name} defaults to {value}, it is {default}"
