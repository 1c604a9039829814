#!/usr/bin/env bash
# GET /pair/{phone} throughput of the release binary under wrk (2 threads x
# 64 connections, load generator on the same machine), once with the default
# logging (one JSON line per request) and once with RUST_LOG=warn (no request
# lines); prints both, each the median of RUNS runs, and their ratio. The
# two kinds of run alternate, so a machine that drifts (a shared host's
# speed moves by 10% over minutes) skews both alike.
#
#   benches/http_load.sh            # needs wrk: apt-get install wrk
#
# The caller is a server (API key), as Supabase edge functions are; its
# budget is 20 x RATE_LIMIT_READS_PER_MIN, set out of reach here. Logs go to
# /dev/null, so the figure is the cost of producing them, not of a terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
RUNS=${RUNS:-5}
DURATION=${DURATION:-10s}
KEY=bench-key-0123456789abcdef0123456789abcdef
cargo build --release --quiet --bin wa-pair
BIN=target/release/wa-pair

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# One wrk run against a fresh service; $1 is RUST_LOG (empty: the default).
one_run() {
  local port dir pid rate
  port=$(free_port)
  dir=$(mktemp -d)
  env -i PATH="$PATH" HOST=127.0.0.1 PORT="$port" DATA_DIR="$dir" API_KEYS="$KEY" \
    PAIR_WARM_CLIENTS=0 RATE_LIMIT_READS_PER_MIN=1000000 WA_VERSION=2.3000.1023456789 \
    ${1:+RUST_LOG=$1} "$BIN" >/dev/null 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do sleep 0.05; done
  rate=$(wrk -t2 -c64 -d"$DURATION" -H "Authorization: Bearer $KEY" \
    "http://127.0.0.1:$port/pair/6281234567890" | awk '/Requests\/sec/ { print $2 }')
  kill "$pid"
  wait "$pid" || true
  rm -rf "$dir"
  echo "$rate"
}

median() {
  sort -n | awk '{ v[NR] = $1 } END { printf "%s (runs %s to %s)", v[int((NR + 1) / 2)], v[1], v[NR] }'
}

logged_runs=()
quiet_runs=()
for _ in $(seq "$RUNS"); do
  logged_runs+=("$(one_run "")")
  quiet_runs+=("$(one_run "warn")")
done
logged_line=$(printf '%s\n' "${logged_runs[@]}" | median)
quiet_line=$(printf '%s\n' "${quiet_runs[@]}" | median)
logged=${logged_line%% *}
quiet=${quiet_line%% *}
echo "GET /pair/{phone}, wrk 2 threads x 64 connections, median of $RUNS x $DURATION:"
echo "  default logging (one line per request): $logged_line req/s (target >= 80000)"
echo "  RUST_LOG=warn (no request lines):        $quiet_line req/s"
awk -v a="$logged" -v b="$quiet" 'BEGIN { printf "  logging costs %.1f%% of throughput (target <= 10%%)\n", (1 - a / b) * 100 }'
