#!/usr/bin/env bash
# Postroom benchmark (`make bench`): starts a throw-away server on loopback, drives it with
# postroom-loadgen, and prints a Markdown table of rates, latency and server CPU per message.
# It measures; it asserts nothing. See bench/README.md for the knobs.
set -euo pipefail

cd "$(dirname "$0")/.."

N=${N:-5000}                      # messages for the 1 KiB SMTP scenarios (N/10 for 100 KiB)
SIZE=${SIZE:-1024}                # message size for scenarios (a) and (b)
C=${C:-10}                        # SMTP client concurrency
POP_C=${POP_C:-4}                 # POP3 client concurrency
POP_MSGS=${POP_MSGS:-100}         # messages per mailbox for the POP3 scenarios
POP_SIZE=${POP_SIZE:-10240}       # their size
POP_SESSIONS=${POP_SESSIONS:-2000}
MAX_SECONDS=${MAX_SECONDS:-60}    # bound on each scenario
BUDGET_SECONDS=${BUDGET_SECONDS:-480}  # bound on all scenarios together (the build excluded)
POSTROOM=${POSTROOM_BIN:-target/release/postroom}
LOADGEN=${LOADGEN_BIN:-target/release/postroom-loadgen}

if [[ -z "${SKIP_BUILD:-}" ]]; then
    cargo build --release -p postroom -p loadgen
fi
for b in "$POSTROOM" "$LOADGEN"; do
    [[ -x "$b" ]] || { echo "bench: $b not found or not executable" >&2; exit 1; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/postroom-bench.XXXXXX")
DATA="$TMP/data"
CFG="$TMP/postroom.toml"
SERVER_PID=""
CHILD=""   # the bounded client command running now, if any

# bounded OUTFILE ERRFILE SECONDS CMD...: runs CMD under `timeout` in the background and waits,
# so that a signal to this script is handled at once (the trap then stops CMD too). Sets RC.
bounded() {
    local out=$1 err=$2 secs=$3
    shift 3
    RC=0
    timeout -k 5 "$secs" "$@" >"$out" 2>"$err" &
    CHILD=$!
    wait "$CHILD" || RC=$?
    CHILD=""
}

stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "bench: server did not stop within 10 s of SIGTERM; sending SIGKILL" >&2
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$CHILD" ]]; then
        kill -TERM "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true
    fi
    stop_server
    if [[ -n "${KEEP_TMP:-}" ]]; then
        echo "bench: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# No DNS: resolvers point at a loopback port where nothing answers; all mail is local.
cat >"$CFG" <<EOF
data_dir = "$DATA"
hostname = "bench.example.test"
domains = ["example.test"]
postmaster = "admin@example.test"

[smtp]
listen = ["127.0.0.1:0"]
submission_listen = []
tls_listen = []
max_sessions = 500
max_sessions_per_ip = 500

[pop3]
listen = ["127.0.0.1:0"]
tls_listen = []
max_sessions = 500
max_sessions_per_ip = 500

[dns]
servers = ["127.0.0.1:9"]

[storage]
min_free_mb = 0

[journal]
enabled = true
EOF

pw() { echo "bench-pw-$1"; }
USERS=(u1 u2 u3 u4 u5 u6 u7 u8 u9 u10)
for u in "${USERS[@]}" admin; do
    pw "$u" | timeout 60 "$POSTROOM" --config "$CFG" user add "$u" --address "$u@example.test" \
        --password-stdin >/dev/null || { echo "bench: user add $u failed" >&2; exit 1; }
done

"$POSTROOM" --config "$CFG" serve >"$TMP/serve.log" 2>&1 &
SERVER_PID=$!

for _ in $(seq 1 300); do
    if [[ -s "$DATA/listening" ]] && grep -q '^smtp ' "$DATA/listening" \
        && grep -q '^pop3 ' "$DATA/listening"; then
        break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "bench: server exited during start-up; its log:" >&2
        tail -n 30 "$TMP/serve.log" >&2
        exit 1
    fi
    sleep 0.1
done
SMTP_ADDR=$(awk '$1 == "smtp" { print $2; exit }' "$DATA/listening" 2>/dev/null || true)
POP_ADDR=$(awk '$1 == "pop3" { print $2; exit }' "$DATA/listening" 2>/dev/null || true)
if [[ -z "$SMTP_ADDR" || -z "$POP_ADDR" ]]; then
    echo "bench: no smtp/pop3 lines in $DATA/listening after 30 s; server log:" >&2
    tail -n 30 "$TMP/serve.log" >&2
    exit 1
fi
for a in "$SMTP_ADDR" "$POP_ADDR"; do
    [[ "$a" == 127.* || "$a" == "[::1]:"* ]] || { echo "bench: $a is not loopback" >&2; exit 1; }
done

CLK_TCK=$(getconf CLK_TCK)
NPROC=$(nproc 2>/dev/null || echo '?')
START=$(date +%s)
DEADLINE=$((START + BUDGET_SECONDS))

# Server CPU time (utime + stime, all threads) in clock ticks; empty if the server is gone.
cpu_ticks() {
    local s
    s=$(cat "/proc/$SERVER_PID/stat" 2>/dev/null) || return 0
    s=${s##*) }                     # drop "pid (comm) ", comm may hold spaces
    # shellcheck disable=SC2086
    set -- $s                       # $1 = state (field 3), so utime = $12, stime = $13
    echo $(( ${12} + ${13} ))
}
peak_rss_mib() {
    awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$SERVER_PID/status" 2>/dev/null || true
}
# Value of a numeric field in a flat one-line JSON object.
jget() { sed -n "s/.*\"$2\":\([-0-9.eE+]*\).*/\1/p" <<<"$1"; }
fmt() { awk -v x="$1" -v p="${2:-1}" 'BEGIN { if (x == "") print "n/a"; else printf "%.*f", p, x }'; }
# Seconds left for a scenario: the smaller of MAX_SECONDS and what the budget still allows.
time_left() {
    local left=$((DEADLINE - $(date +%s)))
    ((left < MAX_SECONDS)) && echo "$left" || echo "$MAX_SECONDS"
}

ROWS=()
ERRFILES=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }

# run_loadgen NAME -- ARGS...: runs the loadgen with a bound, sets OUT (its JSON) and CPU_US
# (server CPU microseconds used meanwhile), and NOTE_RUN (status remarks).
run_loadgen() {
    local name=$1 secs c0 c1
    shift
    secs=$(time_left)
    OUT="" CPU_US="" NOTE_RUN="" CPU_NOTE=""
    if ((DEADLINE - $(date +%s) < 5)); then
        NOTE_RUN="skipped: time budget (BUDGET_SECONDS=$BUDGET_SECONDS) used up"
        return 0
    fi
    c0=$(cpu_ticks)
    bounded "$TMP/$name.json" "$TMP/$name.err" $((secs + 30)) "$LOADGEN" "$@" --max-seconds "$secs"
    OUT=$(cat "$TMP/$name.json")
    c1=$(cpu_ticks)
    if [[ -n "$c0" && -n "$c1" ]]; then
        CPU_US=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN { print (b - a) / t * 1e6 }')
        # Clock-tick resolution: flag short scenarios whose CPU figure is coarse.
        if ((c1 - c0 < 100)); then
            CPU_NOTE="server CPU from only $((c1 - c0)) clock ticks: coarse"
        fi
    else
        NOTE_RUN="server not running"
    fi
    ((RC == 0)) || NOTE_RUN="${NOTE_RUN:+$NOTE_RUN; }loadgen exit $RC"
    grep -q 'max-seconds reached' "$TMP/$name.err" 2>/dev/null \
        && NOTE_RUN="${NOTE_RUN:+$NOTE_RUN; }stopped at the ${secs} s bound"
    local unfinished
    unfinished=$(jget "$OUT" unfinished)
    [[ "${unfinished:-0}" == 0 ]] || NOTE_RUN="${NOTE_RUN:+$NOTE_RUN; }$unfinished cut off in flight"
    [[ -s "$TMP/$name.err" ]] && ERRFILES+=("$name")
    return 0
}
per() { # per CPU_US COUNT -> µs per unit
    awk -v c="$1" -v n="$2" 'BEGIN { if (c == "" || n + 0 == 0) print ""; else print c / n }'
}

smtp_scenario() { # label name size messages extra-args...
    local label=$1 name=$2 size=$3 msgs=$4
    shift 4
    run_loadgen "$name" smtp --addr "$SMTP_ADDR" --messages "$msgs" --size "$size" \
        --from "bench@example.test" --to "admin@example.test" "$@"
    local acc err secs
    acc=$(jget "$OUT" accepted) err=$(jget "$OUT" errors) secs=$(jget "$OUT" seconds)
    row "$label" "$(fmt "$(jget "$OUT" msgs_per_sec)" 1) msg/s" "$(fmt "$(jget "$OUT" mb_per_sec)" 2)" \
        "$(fmt "$(per "$CPU_US" "$acc")" 0)" "$(fmt "$(jget "$OUT" p50_ms)" 2)" \
        "${acc:-0}/$msgs accepted, ${err:-?} errors, $(fmt "$secs" 2) s, p99 $(fmt "$(jget "$OUT" p99_ms)" 2) ms, peak RSS $(peak_rss_mib) MiB${NOTE_RUN:+; $NOTE_RUN}${CPU_NOTE:+; $CPU_NOTE}"
}

echo "bench: server pid $SERVER_PID, smtp $SMTP_ADDR, pop3 $POP_ADDR; N=$N SIZE=$SIZE C=$C" >&2

echo "bench: (a) SMTP, new connection per message" >&2
smtp_scenario "(a) SMTP $SIZE B, new conn/msg, C=$C" a "$SIZE" "$N" --concurrency "$C"
echo "bench: (b) SMTP, persistent connections" >&2
smtp_scenario "(b) SMTP $SIZE B, persistent, C=$C" b "$SIZE" "$N" --concurrency "$C" --reuse
echo "bench: (c) SMTP 100 KiB, persistent connections" >&2
smtp_scenario "(c) SMTP 100 KiB, persistent, C=$C" c 102400 $((N / 10 > 0 ? N / 10 : 1)) \
    --concurrency "$C" --reuse

# (d) setup: POP_MSGS messages of POP_SIZE to each of u1..u10 (one message, ten recipients).
echo "bench: (d) filling ${#USERS[@]} mailboxes with $POP_MSGS messages of $POP_SIZE B" >&2
TO_ARGS=() USER_ARGS=()
for u in "${USERS[@]}"; do
    TO_ARGS+=(--to "$u@example.test")
    USER_ARGS+=(--user "$u:$(pw "$u")")
done
run_loadgen fill smtp --addr "$SMTP_ADDR" --messages "$POP_MSGS" --size "$POP_SIZE" \
    --concurrency "$POP_C" --reuse --from "bench@example.test" "${TO_ARGS[@]}"
FILL_NOTE="fill: $(jget "$OUT" accepted)/$POP_MSGS accepted${NOTE_RUN:+ ($NOTE_RUN)}, peak RSS then $(peak_rss_mib) MiB"
# Delivery into mailboxes may lag the 250: poll STAT over POP3 until every box holds POP_MSGS.
FILLED=""
WAIT_UNTIL=$(($(date +%s) + $(time_left)))
while (($(date +%s) < WAIT_UNTIL)); do
    bounded "$TMP/stat.json" /dev/null 30 "$LOADGEN" pop3 --addr "$POP_ADDR" "${USER_ARGS[@]}" \
        --mode stat --concurrency "$POP_C" --max-seconds 20
    S=$(cat "$TMP/stat.json")
    MINM=$(jget "$S" min_messages)
    if [[ -n "$MINM" && "$(jget "$S" users)" == "${#USERS[@]}" ]] && ((MINM >= POP_MSGS)); then
        FILLED=1
        break
    fi
    sleep 0.5
done
if [[ -z "$FILLED" ]]; then
    FILL_NOTE="$FILL_NOTE; mailboxes not full in time (STAT: ${S:-none})"
    echo "bench: queue after waiting:" >&2
    bounded "$TMP/queue.txt" "$TMP/queue.err" 20 "$POSTROOM" --config "$CFG" queue list
    head -n 20 "$TMP/queue.txt" "$TMP/queue.err" >&2
fi

echo "bench: (d) POP3 retr-all" >&2
run_loadgen d pop3 --addr "$POP_ADDR" "${USER_ARGS[@]}" --mode retr-all --concurrency "$POP_C"
n=$(jget "$OUT" retrieved)
row "(d) POP3 RETR all, ${#USERS[@]} users × $POP_MSGS × $((POP_SIZE / 1024)) KiB, C=$POP_C" \
    "$(fmt "$(jget "$OUT" retr_per_sec)" 1) RETR/s" "$(fmt "$(jget "$OUT" mb_per_sec)" 2)" \
    "$(fmt "$(per "$CPU_US" "$n")" 0)" "—" \
    "${n:-0} retrieved, $(jget "$OUT" errors) errors, $(fmt "$(jget "$OUT" seconds)" 2) s; $FILL_NOTE; peak RSS $(peak_rss_mib) MiB${NOTE_RUN:+; $NOTE_RUN}${CPU_NOTE:+; $CPU_NOTE}"

echo "bench: (e) POP3 login-one" >&2
run_loadgen e pop3 --addr "$POP_ADDR" "${USER_ARGS[@]}" --mode login-one \
    --sessions "$POP_SESSIONS" --concurrency "$POP_C"
n=$(jget "$OUT" sessions)
row "(e) POP3 login + RETR 1 + QUIT, C=$POP_C" "$(fmt "$(jget "$OUT" sessions_per_sec)" 1) sessions/s" "—" \
    "$(fmt "$(per "$CPU_US" "$n")" 0)" "$(fmt "$(jget "$OUT" p50_ms)" 2)" \
    "${n:-0}/$POP_SESSIONS sessions, $(jget "$OUT" errors) errors, $(fmt "$(jget "$OUT" seconds)" 2) s, p99 $(fmt "$(jget "$OUT" p99_ms)" 2) ms; µs per session; peak RSS $(peak_rss_mib) MiB${NOTE_RUN:+; $NOTE_RUN}${CPU_NOTE:+; $CPU_NOTE}"

# Optional peer data point: Postfix's smtp-source, only if already installed (not installed here).
SMTP_SOURCE=$(command -v smtp-source || { [[ -x /usr/sbin/smtp-source ]] && echo /usr/sbin/smtp-source; } || true)
if [[ -n "$SMTP_SOURCE" ]]; then
    secs=$(time_left)
    if ((DEADLINE - $(date +%s) >= 5)); then
        echo "bench: (f) smtp-source" >&2
        c0=$(cpu_ticks)
        t0=$(date +%s.%N)
        bounded "$TMP/f.out" "$TMP/f.err" "$secs" "$SMTP_SOURCE" -s 10 -m "$N" -l 1024 -f a@b \
            -t u1@example.test "$SMTP_ADDR"
        rc=$RC
        t1=$(date +%s.%N)
        c1=$(cpu_ticks)
        el=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
        cpu=""
        [[ -n "$c0" && -n "$c1" ]] && cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN { print (b - a) / t * 1e6 }')
        note="$N messages in $(fmt "$el" 2) s (wall clock, includes client start-up)"
        ((rc == 0)) || note="$note; smtp-source exit $rc (124 = time bound): rate is an upper bound"
        row "(f) smtp-source -s 10 -l 1024 (Postfix peer client)" \
            "$(fmt "$(awk -v n="$N" -v e="$el" 'BEGIN { print n / e }')" 1) msg/s" \
            "$(fmt "$(awk -v n="$N" -v e="$el" 'BEGIN { print n * 1024 / e / 1e6 }')" 2)" \
            "$(fmt "$(per "$cpu" "$N")" 0)" "—" "$note"
    fi
fi

RSS=$(peak_rss_mib)
echo
echo "## Postroom benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ), $NPROC CPUs, loopback)"
echo
echo "| scenario | rate | MB/s | server CPU µs/msg | p50 ms | notes |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Server peak RSS (VmHWM): ${RSS:-n/a} MiB. MB = 10^6 octets of message data; server CPU is"
echo "utime+stime of the server process during the scenario (clock tick ${CLK_TCK} Hz) divided by"
echo "messages accepted / RETRs / sessions. Loadgen and server share the same $NPROC CPUs."
for f in "${ERRFILES[@]}"; do
    echo
    echo "loadgen messages, scenario $f:"
    head -n 8 "$TMP/$f.err" | sed 's/^/    /'
done
