#!/bin/sh
# Installs the ckptd daemon into a fresh virtual environment: the package and its own
# dependencies only (no torch, no test tools), plus any extras named, e.g. "s3".
#
#   usage: install-daemon.sh VENV_DIR [PROJECT_DIR] [EXTRAS]
#
# The Dockerfile's build stage runs this script, tests/deploy/test_image_install.py runs
# it too, and the systemd unit expects its result at /opt/ckptd: one install, exercised by
# CI. $PYTHON picks the interpreter (default python3); pip's own environment variables
# (PIP_NO_CACHE_DIR, PIP_INDEX_URL, ...) apply.
set -eu

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
    echo "usage: $0 VENV_DIR [PROJECT_DIR] [EXTRAS]" >&2
    exit 2
fi
venv=$1
project=${2:-.}
extras=${3:-}

if [ -e "$venv" ]; then
    echo "$0: $venv already exists; the daemon goes into a fresh environment" >&2
    exit 1
fi
# pip reads a bare relative name ("src") as a package name; hand it an absolute path.
project=$(cd "$project" && pwd)
requirement=$project
if [ -n "$extras" ]; then
    requirement="$project[$extras]"
fi

"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --no-input --disable-pip-version-check "$requirement"

# The daemon image must stay slim: fail the build if anything pulled torch in.
"$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)' || {
    echo "$0: torch was installed into the daemon environment; it must not be" >&2
    exit 1
}
