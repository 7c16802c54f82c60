#!/usr/bin/env bash
# Installs redis-server and redis-tools from Debian packages when they are missing.
# Sourced by the run and test scripts; safe to run again.
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "sidecache: installing redis-server and redis-tools (Debian packages)..." >&2
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi
