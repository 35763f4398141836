#!/usr/bin/env bash
# A Ray cluster of N nodes on this machine, loopback only, token auth on (deploy/CLUSTER.md):
#   deploy/local-cluster.sh start N [--cpus C] [--dashboard]   # the last line: export RAY_ADDRESS=...
#   eval "$(deploy/local-cluster.sh start 2 | tail -n 1)"      # the same, exported in this shell
#   deploy/local-cluster.sh stop                               # ends that cluster's processes only
# GRACEFUL_CLUSTER_DIR (default /tmp/graceful-cluster-$UID) holds its token, state and logs;
# GRACEFUL_PYTHON picks the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${GRACEFUL_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then
        python="$root/.venv/bin/python"
    else
        python="$(command -v python3)"
    fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m deploy.local_cluster "$@"
