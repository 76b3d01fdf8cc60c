#!/usr/bin/env bash
# A whole outcomebench network on loopback (127.0.0.1 only): network PKI, one site agent
# service and one SuperNode per synthetic clinic, a SuperLink with TLS, node
# authentication and a database; then one study end to end, a verified signed bundle,
# and every process stopped by its PID (also on failure or Ctrl-C).
#
#   deploy/local/run.sh [SITES] [DIR]        e.g. deploy/local/run.sh 5 /tmp/obnet
#
# The logs of every daemon and of the run stay in DIR/network/logs.
set -euo pipefail
sites="${1:-3}"
dir="${2:-outcomebench-local}"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec outcomebench-coordinator demo --sites "$sites" --out "$dir"
