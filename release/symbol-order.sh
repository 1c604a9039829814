#!/usr/bin/env bash
# Regenerates release/symbol-order.txt, the order in which the linker lays
# out the release binary's functions (see build.rs for why).
#
#   release/symbol-order.sh        # needs valgrind, curl, python3, nm
#
# It builds the release binary, runs it under callgrind through four
# scenarios and writes every function each one executed, grouped by the
# first scenario that ran it (in the current layout's order inside a group):
#
#   1. idle, warm pool off;
#   2. idle, warm pool on, WhatsApp unreachable (what `cargo bench --bench
#      startup` measures);
#   3. idle, warm pool on, the fake WhatsApp listening: each connect runs
#      the Noise handshake until the release build's check of the server's
#      certificate refuses the fake (it is not signed by WhatsApp), so what
#      runs after (login, code requests, links) is not in the list and
#      stays where the linker puts it;
#   4. requests: a session started, read, followed and cancelled, a bad
#      phone, an unknown session, no credentials, metrics, the OpenAPI
#      document, an unknown route.
#
# Run it again after a dependency update, a toolchain update or a large
# change: names that no longer exist are skipped by the linker, so a stale
# file costs memory, never correctness. `cargo bench --bench startup` shows
# whether it is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind curl python3 nm; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

# The names carry a hash of each crate's build settings: build exactly as
# the Docker image does (no extra flags, the same toolchain: see its FROM).
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
echo "toolchain: $(rustc --version)"
# The fake WhatsApp in a cargo invocation of its own: built together with
# wa-pair, its features would unify into wa-pair's dependencies and change
# their symbol names.
cargo build --release --locked --quiet --bin wa-pair
cargo build --locked --quiet -p fake-wa --bin fake-wa
BIN=$PWD/target/release/wa-pair
FAKE=$PWD/target/debug/fake-wa
KEY=order-key-0123456789abcdef0123456789abcdef
PHONE=628123456789
UNKNOWN_PHONE=628123456780
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start <name> <warm clients> <ws url>: the service under callgrind, its
# profile to $WORK/<name>.out; sets PORT and PID.
start() {
  PORT=$(free_port)
  mkdir -p "$WORK/$1.data"
  env -i PATH="$PATH" HOST=127.0.0.1 PORT="$PORT" DATA_DIR="$WORK/$1.data" \
    WA_VERSION=2.3000.1023456789 WA_WS_URL="$3" PAIR_WARM_CLIENTS="$2" API_KEYS="$KEY" \
    valgrind --tool=callgrind --demangle=no --callgrind-out-file="$WORK/$1.out" \
    "$BIN" >"$WORK/$1.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && return 0
    sleep 0.1
  done
  echo "$1: the service never became healthy" >&2
  exit 1
}

# stop: SIGTERM, so the service shuts down and callgrind writes its profile.
stop() {
  kill -TERM "$PID"
  for _ in $(seq 600); do
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$PID" 2>/dev/null && { echo "the service did not stop" >&2; exit 1; }
  wait "$PID" || true
}

# expect <status> <curl arguments>: one request as a server caller, which
# must answer <status>: a scenario that only met errors would list only
# the error paths.
expect() {
  local want=$1 got
  shift
  got=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" \
    -H 'content-type: application/json' "$@")
  [ "$got" = "$want" ] || { echo "requests: $* answered $got, not $want" >&2; exit 1; }
}

# The fake WhatsApp as a coprocess: its first line is its WebSocket URL.
coproc FAKE_WA { "$FAKE"; }
read -r line <&"${FAKE_WA[0]}"
WS_URL=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["ws_url"])' "$line")
UNREACHABLE="ws://127.0.0.1:$(free_port)/ws/chat"

echo "1/4 idle, pool off"
start idle_off 0 "$UNREACHABLE"
sleep 3
stop

echo "2/4 idle, pool on, WhatsApp unreachable"
start idle_unreachable 2 "$UNREACHABLE"
sleep 8
stop

echo "3/4 idle, pool on, refused at the certificate check"
start idle_handshake 2 "$WS_URL"
sleep 10
stop

echo "4/4 requests"
start requests 2 "$WS_URL"
URL=http://127.0.0.1:$PORT
expect 202 -X POST "$URL/pair" -d "{\"phone\":\"$PHONE\"}"
expect 200 "$URL/pair/$PHONE"
expect 404 "$URL/pair/$PHONE/qr.svg"
# A stream never ends by itself: curl gives up after 2 s (exit code 28).
curl -s -m 2 -o /dev/null -H "Authorization: Bearer $KEY" "$URL/pair/$PHONE/events" || [ $? = 28 ]
expect 200 -X DELETE "$URL/pair/$PHONE"
expect 404 "$URL/pair/$UNKNOWN_PHONE"
expect 422 -X POST "$URL/pair" -d '{"phone":"+62 812"}'
expect 200 "$URL/metrics"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/pair/$PHONE")" = 401 ]
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/openapi.json")" = 200 ]
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/no-such-route")" = 404 ]
stop

python3 - "$BIN" release/symbol-order.txt \
  "$WORK"/idle_off.out "$WORK"/idle_unreachable.out "$WORK"/idle_handshake.out "$WORK"/requests.out <<'EOF'
import re, subprocess, sys

binary, out, profiles = sys.argv[1], sys.argv[2], sys.argv[3:]
address = {}
listing = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True)
for line in listing.stdout.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[1] in "tTwW":
        address.setdefault(parts[2], int(parts[0], 16))
if not address:
    sys.exit(f"{binary} has no symbol table (the release profile must keep it)")
seen, order = set(), []
for profile in profiles:
    ran = set()
    for line in open(profile, errors="replace"):
        m = re.match(r"^c?fn=\(\d+\) (\S+)", line)
        # callgrind marks recursion depth with a ' suffix: `name'2`.
        name = m.group(1).split("'")[0] if m else None
        if name in address and name not in seen:
            ran.add(name)
    # Every scenario runs code the ones before did not; none that did
    # means its profile is not what this script thinks it is.
    if not ran:
        sys.exit(f"{profile}: no function of {binary} in it")
    seen |= ran
    order += sorted(ran, key=address.get)
    print(f"{profile.rsplit('/', 1)[-1]}: {len(ran)} more functions")
with open(out, "w") as f:
    f.write("\n".join(order) + "\n")
print(f"{out}: {len(order)} functions")
EOF
