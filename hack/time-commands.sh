#!/usr/bin/env bash
# Times the README's two commands on a fresh clone, cold (every cache empty: cargo registry,
# cargo target dir, Go module and build caches, control plane binaries) and then warm.
#
#   hack/time-commands.sh [WORKDIR] [all|run|check]
#
# WORKDIR defaults to a new temporary directory, kept for inspection. Prints one line per
# measurement. Takes 30+ minutes for both commands on 2 cores.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/roster-timing.XXXXXX")}
mode=${2:-all}
mkdir -p "$work"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }

# One fresh environment: its own clone and empty caches.
fresh() { # $1 = name
  local env="$work/$1"
  rm -rf "$env"
  git clone -q "$repo" "$env/src"
  mkdir -p "$env/cargo-home"
  echo "$env"
}
with_env() { # $1 = env dir, rest = command
  local env=$1; shift
  (cd "$env/src" && env CARGO_HOME="$env/cargo-home" CARGO_TARGET_DIR="$env/target" \
    ROSTER_CACHE_DIR="$env/cache" PATH="$HOME/.cargo/bin:$PATH" "$@")
}

# The run command: time until it prints "Roster is running", then stop it with Ctrl-C (SIGINT).
time_run() { # $1 = env dir, $2 = label
  local env=$1 log="$1/run-$2.log" start pid
  start=$(now)
  with_env "$env" cargo run -- dev --http-addr 127.0.0.1:0 >"$log" 2>&1 &
  pid=$!
  until grep -q "Roster is running" "$log"; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "run command failed; see $log" >&2; return 1; fi
    sleep 1
  done
  echo "run command ($2): $(elapsed "$start") s to 'Roster is running'"
  pkill -INT -f "$env/target/debug/roster dev" || true
  wait "$pid" || true
}

time_check() { # $1 = env dir, $2 = label
  local env=$1 start
  start=$(now)
  with_env "$env" hack/check >"$env/check-$2.log" 2>&1 || { echo "test command failed; see $env/check-$2.log" >&2; return 1; }
  echo "test command ($2): $(elapsed "$start") s"
}

echo "commit $(git -C "$repo" rev-parse --short HEAD), $(nproc) cores"
if [ "$mode" != check ]; then
  run_env=$(fresh run)
  time_run "$run_env" cold
  time_run "$run_env" warm
fi
if [ "$mode" != run ]; then
  check_env=$(fresh check)
  time_check "$check_env" cold
  time_check "$check_env" warm
  echo "disk: $(du -sh "$check_env/cache/bin" | cut -f1) control plane binaries, $(du -sh "$check_env/cache/go" | cut -f1) Go module and build caches, $(du -sh "$check_env/target" | cut -f1) cargo target, $(du -sh "$check_env/cargo-home" | cut -f1) cargo registry"
fi
echo "logs and caches kept in $work"
