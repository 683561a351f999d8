#!/usr/bin/env bash
# Postroom benchmark (`make bench`), side by side with Postfix, smtp-sink and Dovecot.
#
# Starts a throw-away Postroom and private peer instances (bench/peers.sh) on loopback high ports
# under one temporary directory, runs each scenario ROUNDS times with the targets interleaved
# (A B A B ...), and prints a Markdown table of medians, server CPU µs per unit beside every rate,
# and the ratio Postroom/peer against the goals of the performance issue. It measures; it asserts
# nothing. Everything it started is stopped, and the directory deleted, on any exit.
# See bench/README.md for the knobs and BENCHMARKS.md for the method and the latest figures.
# The per-round result lists are split into words on purpose (median, nrounds):
# shellcheck disable=SC2086,SC2206
set -euo pipefail

cd "$(dirname "$0")/.."

N=${N:-5000}                      # messages per run, 1 KiB SMTP scenarios
N_E2E=${N_E2E:-$((N / 2))}        # messages per run, end-to-end scenario
N_BIG=${N_BIG:-$((N / 10 > 0 ? N / 10 : 1))}  # messages per run, 100 KiB scenario
ROUNDS=${ROUNDS:-3}               # interleaved rounds per scenario (medians over these)
C=${C:-10}                        # SMTP sessions
POP_C=${POP_C:-4}                 # POP3 clients
POP_MSGS=${POP_MSGS:-100}         # messages per POP3 mailbox (10 mailboxes)
POP_SIZE=${POP_SIZE:-10240}
POP_REPEAT=${POP_REPEAT:-10}      # passes over the 10 mailboxes per retr-all run
POP_SESSIONS=${POP_SESSIONS:-1000} # login-one sessions per run
BIG_BOX=${BIG_BOX:-10000}         # messages already in the "full" mailbox
IDLE=${IDLE:-1000}                # idle SMTP connections, and as many idle POP3 connections
HUGE=${HUGE:-50000000}            # size of the one large message (octets)
MAX_SECONDS=${MAX_SECONDS:-60}    # bound on each single run
BUDGET_SECONDS=${BUDGET_SECONDS:-720}  # bound on all scenarios together (build, install excluded)
PEERS=${PEERS:-1}                 # 0: Postroom only
POSTROOM=${POSTROOM_BIN:-target/release/postroom}
LOADGEN=${LOADGEN_BIN:-target/release/postroom-loadgen}

# shellcheck source=bench/peers.sh
source bench/peers.sh

if [[ -z "${SKIP_BUILD:-}" ]]; then
    cargo build --release -p postroom -p loadgen
fi
for b in "$POSTROOM" "$LOADGEN"; do
    [[ -x "$b" ]] || { echo "bench: $b not found or not executable" >&2; exit 1; }
done
HAVE_PEERS=""
if [[ "$PEERS" != 0 ]]; then
    if peers_install; then
        HAVE_PEERS=1
    else
        echo "bench: running without peers" >&2
    fi
fi
SMTP_SOURCE=$(command -v smtp-source || true)
if [[ -z "$SMTP_SOURCE" ]]; then
    echo "bench: smtp-source (package postfix) is needed for the SMTP scenarios" >&2
    exit 1
fi

# 2,000 idle connections need descriptors on both ends.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

TMP=$(mktemp -d "${TMPDIR:-/tmp}/postroom-bench.XXXXXX")
chmod 755 "$TMP"   # the peers' unprivileged workers traverse it
DATA="$TMP/data"
CFG="$TMP/postroom.toml"
SERVER_PID=""
CHILD=""   # the bounded client command running now, if any
BG_PIDS=() # background clients (idle connections)

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
        for _ in $(seq 1 150); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "bench: server did not stop within 15 s of SIGTERM; sending SIGKILL" >&2
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
    for p in "${BG_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    stop_server
    peers_stop_all
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

now() { date +%s.%N; }
fsub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", b - a }'; }
# Value of a numeric field in a flat one-line JSON object.
jget() { sed -n "s/.*\"$2\":\([-0-9.eE+]*\).*/\1/p" <<<"$1"; }
fmt() { awk -v x="$1" -v p="${2:-1}" 'BEGIN { if (x == "") print "n/a"; else printf "%.*f", p, x }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print ""; else print a / b }'; }
median() {
    printf '%s\n' "$@" | awk 'NF' | sort -g | awk '{ a[NR] = $1 }
        END { if (NR == 0) print ""; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
CLK_TCK=$(getconf CLK_TCK)
ticks_us() { awk -v a="$1" -v b="$2" -v t="$CLK_TCK" 'BEGIN { if (a == "" || b == "") print ""; else print (b - a) / t * 1e6 }'; }

# ---------------------------------------------------------------------------------------------
# Postroom. No DNS: resolvers point at a loopback port where nothing answers; all mail is local.
cat >"$CFG" <<EOF
data_dir = "$DATA"
hostname = "bench.example.test"
domains = ["example.test"]
postmaster = "admin@example.test"

[smtp]
listen = ["127.0.0.1:0"]
submission_listen = []
tls_listen = []
max_sessions = $((IDLE + 500))
max_sessions_per_ip = $((IDLE + 500))

[pop3]
listen = ["127.0.0.1:0"]
tls_listen = []
max_sessions = $((IDLE + 500))
max_sessions_per_ip = $((IDLE + 500))

[dns]
servers = ["127.0.0.1:9"]

[storage]
min_free_mb = 0

[journal]
enabled = true
EOF

PW=bench-pw
USERS=(u1 u2 u3 u4 u5 u6 u7 u8 u9 u10)
EMPTY_USERS=()
for r in $(seq 1 "$ROUNDS"); do EMPTY_USERS+=("empty$r"); done
echo "bench: creating Postroom users" >&2
for u in "${USERS[@]}" admin e2e big "${EMPTY_USERS[@]}"; do
    echo "$PW" | timeout 60 "$POSTROOM" --config "$CFG" user add "$u" --address "$u@example.test" \
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
    [[ "$a" == 127.* ]] || { echo "bench: $a is not IPv4 loopback" >&2; exit 1; }
done

# Peers.
PF_ADDR="" DV_ADDR="" SINK_ADDR=""
if [[ -n "$HAVE_PEERS" ]]; then
    if pf_start "$TMP/postfix" "$(free_port)"; then PF_ADDR="127.0.0.1:$PF_PORT"; fi
    if dv_start "$TMP/dovecot" "$(free_port)" "$PW" "${USERS[@]}"; then DV_ADDR="127.0.0.1:$DV_PORT"; fi
    if sink_start "$(free_port)"; then SINK_ADDR="127.0.0.1:$SINK_PORT"; fi
fi
echo "bench: postroom smtp $SMTP_ADDR pop3 $POP_ADDR; postfix ${PF_ADDR:-none}," \
    "dovecot ${DV_ADDR:-none}, smtp-sink ${SINK_ADDR:-none}; N=$N ROUNDS=$ROUNDS C=$C" >&2

NPROC=$(nproc 2>/dev/null || echo '?')
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s)
DEADLINE=$((START + BUDGET_SECONDS))
time_left() {
    local left=$((DEADLINE - $(date +%s)))
    ((left < MAX_SECONDS)) && echo "$left" || echo "$MAX_SECONDS"
}
budget_ok() { ((DEADLINE - $(date +%s) >= 5)); }

pid_of() { # target -> root pid of its process tree
    case $1 in
        postroom | empty | full) echo "$SERVER_PID" ;;  # empty/full: the mailbox scenario
        postfix) echo "$PF_PID" ;;
        dovecot) echo "$DV_PID" ;;
        sink) echo "$SINK_PID" ;;
    esac
}

# After a client finishes, work the server still does for it (queue runs, delivery after the
# 250) is counted: wait until the tree's CPU stops moving (≤ 1 tick in 0.3 s), at most 15 s.
settle() {
    local root=$1 a b
    a=$(tree_ticks "$root")
    for _ in $(seq 1 50); do
        sleep 0.3
        b=$(tree_ticks "$root")
        [[ -z "$a" || -z "$b" ]] && break
        ((b - a <= 1)) && break
        a=$b
    done
}

# Results: VAL[scenario|target] holds the per-round rates, CPU[scenario|target] the per-round
# server CPU µs per unit, NOTE[scenario|target] remarks.
declare -A VAL CPU NOTE
add_note() { NOTE[$1]="${NOTE[$1]:+${NOTE[$1]}; }$2"; }

# measure KEY TARGET CMD...: runs the client CMD bounded; sets EL (wall seconds from the client's
# start until it ends, or, when AFTER_CLIENT names a command, until that command returns, e.g. once
# every message is in its mailbox; it sets AFTER_OK), CPU_US (server tree CPU µs from the start
# until the tree is idle again), OUTF/ERRF (the client's output files).
AFTER_CLIENT=""
measure() {
    local key=$1 target=$2
    shift 2
    local root c0 c1 t0 t1 secs
    root=$(pid_of "$target")
    secs=$(time_left)
    OUTF="$TMP/run.out" ERRF="$TMP/run.err"
    settle "$root"
    c0=$(tree_ticks "$root")
    t0=$(now)
    bounded "$OUTF" "$ERRF" $((secs + 15)) "$@"
    AFTER_OK=1
    if [[ -n "$AFTER_CLIENT" ]]; then
        $AFTER_CLIENT || AFTER_OK=""
    fi
    t1=$(now)
    EL=$(fsub "$t0" "$t1")
    settle "$root"
    c1=$(tree_ticks "$root")
    CPU_US=$(ticks_us "$c0" "$c1")
    if ((RC != 0)); then
        add_note "$key|$target" "client exit $RC$( ((RC == 124)) && echo ' (time bound)')"
    fi
    if [[ -s "$ERRF" ]] && ! grep -q 'max-seconds reached' "$ERRF"; then
        add_note "$key|$target" "client said: $(head -c 160 "$ERRF" | tr '\n' ' ')"
    fi
    grep -q 'max-seconds reached' "$ERRF" 2>/dev/null && add_note "$key|$target" "stopped at the time bound"
    return 0
}
record() { # KEY TARGET RATE CPU_PER_UNIT
    VAL[$1|$2]="${VAL[$1|$2]:-} $3"
    CPU[$1|$2]="${CPU[$1|$2]:-} $4"
}

# smtp_source_run KEY TARGET ADDR RCPT MSGS SIZE [-d]: smtp-source, rate from wall time.
smtp_source_run() {
    local key=$1 target=$2 addr=$3 rcpt=$4 msgs=$5 size=$6
    shift 6
    measure "$key" "$target" "$SMTP_SOURCE" "$@" -s "$C" -m "$msgs" -l "$size" \
        -f bench@example.test -t "$rcpt" "$addr"
    if ((RC == 0)); then
        record "$key" "$target" "$(div "$msgs" "$EL")" "$(div "$CPU_US" "$msgs")"
    fi
}

pr_stat() { # USER -> messages in the Postroom mailbox (empty on failure)
    { timeout 20 "$LOADGEN" pop3 --addr "$POP_ADDR" --user "$1:$PW" --mode stat --concurrency 1 \
        --max-seconds 10 2>/dev/null || true; } | sed -n 's/.*"messages":\([0-9]*\).*/\1/p'
}

# wait_count KIND USER|- TARGET_COUNT SECONDS: polls until the mailbox holds TARGET_COUNT;
# returns 1 on timeout. KIND: postroom (POP3 STAT) or postfix (Maildir files).
wait_count() {
    local kind=$1 user=$2 want=$3 until n
    until=$(($(date +%s) + $4))
    while (($(date +%s) < until)); do
        if [[ $kind == postroom ]]; then n=$(pr_stat "$user"); else n=$(pf_maildir_count); fi
        [[ -n "$n" ]] && ((n >= want)) && return 0
        sleep 0.1
    done
    return 1
}

echo "bench: scenarios, budget ${BUDGET_SECONDS} s" >&2

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status" 2>/dev/null; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$SERVER_PID/status" 2>/dev/null; }

# --- S8: idle connections: Postroom's total RSS (first, on the fresh server) ------------
IDLE_RESULT="" IDLE_NOTE=""
if budget_ok; then
    echo "bench: $IDLE idle SMTP + $IDLE idle POP3 connections" >&2
    rss0=$(rss_kib)
    rm -f "$TMP/idle-smtp.ready" "$TMP/idle-pop3.ready"
    timeout 120 "$LOADGEN" idle --addr "$SMTP_ADDR" --proto smtp --connections "$IDLE" \
        --hold-seconds 8 --ready-file "$TMP/idle-smtp.ready" --max-seconds 40 \
        >"$TMP/idle-smtp.json" 2>"$TMP/idle-smtp.err" &
    BG_PIDS+=($!)
    timeout 120 "$LOADGEN" idle --addr "$POP_ADDR" --proto pop3 --connections "$IDLE" \
        --hold-seconds 8 --ready-file "$TMP/idle-pop3.ready" --max-seconds 40 \
        >"$TMP/idle-pop3.json" 2>"$TMP/idle-pop3.err" &
    BG_PIDS+=($!)
    for _ in $(seq 1 500); do
        [[ -s "$TMP/idle-smtp.ready" && -s "$TMP/idle-pop3.ready" ]] && break
        sleep 0.1
    done
    sleep 1
    rss1=$(rss_kib)
    IDLE_RESULT=$(awk -v k="$rss1" 'BEGIN { if (k != "") printf "%.1f", k / 1024 }')
    IDLE_NOTE="opened: SMTP $(jget "$(cat "$TMP/idle-smtp.ready" 2>/dev/null)" opened)/$IDLE, POP3 $(jget "$(cat "$TMP/idle-pop3.ready" 2>/dev/null)" opened)/$IDLE; RSS before $(fmt "$(div "$rss0" 1024)" 1) MiB"
    for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    BG_PIDS=()
    for f in smtp pop3; do
        c=$(jget "$(cat "$TMP/idle-$f.json" 2>/dev/null)" closed_during_hold)
        [[ -z "$c" || "$c" == 0 ]] || IDLE_NOTE="$IDLE_NOTE; $f: $c closed by the server during the hold"
    done
fi

# --- S9: one 50 MB message: Postroom's RSS growth -------------------------------------------------
HUGE_RESULT="" HUGE_NOTE=""
if budget_ok; then
    echo "bench: one message of $HUGE octets" >&2
    sleep 1
    # Reset the peak (VmHWM) to the current RSS, so the peak afterwards is this message's.
    echo 5 >"/proc/$SERVER_PID/clear_refs" 2>/dev/null || HUGE_NOTE="could not reset VmHWM (clear_refs); "
    rss0=$(rss_kib)
    bounded "$TMP/huge.json" "$TMP/huge.err" 120 "$LOADGEN" smtp --addr "$SMTP_ADDR" --messages 1 \
        --size "$HUGE" --concurrency 1 --from bench@example.test --to admin@example.test --max-seconds 100
    sleep 1
    hwm=$(hwm_kib)
    o=$(cat "$TMP/huge.json")
    HUGE_RESULT=$(awk -v a="$rss0" -v b="$hwm" 'BEGIN { if (a != "" && b != "") printf "%.1f", (b - a) * 1024 / 1e6 }')
    HUGE_NOTE="${HUGE_NOTE}accepted $(jget "$o" accepted)/1 in $(fmt "$(jget "$o" seconds)" 2) s; RSS before $(fmt "$(div "$rss0" 1024)" 1) MiB, peak $(fmt "$(div "$hwm" 1024)" 1) MiB"
fi

# --- S1, S2: SMTP accept, 1 KiB, new connection per message / persistent -----------------------
for s in new persist; do
    flag=()
    [[ $s == persist ]] && flag=(-d)
    for r in $(seq 1 "$ROUNDS"); do
        budget_ok || break
        echo "bench: smtp-$s round $r" >&2
        smtp_source_run "smtp-$s" postroom "$SMTP_ADDR" admin@example.test "$N" 1024 "${flag[@]}"
        [[ -n "$PF_ADDR" ]] && smtp_source_run "smtp-$s" postfix "$PF_ADDR" sink@example.test "$N" 1024 "${flag[@]}"
        [[ -n "$SINK_ADDR" ]] && smtp_source_run "smtp-$s" sink "$SINK_ADDR" sink@example.test "$N" 1024 "${flag[@]}"
    done
done

# --- S3: accepted -> in the mailbox ------------------------------------------------------------
# The time runs from the client's start until the last message is in the mailbox (Postroom: POP3
# STAT polled every 0.1 s; Postfix: files in the Maildir's new/ counted every 0.1 s).
E2E_WANT=0
e2e_wait_postroom() { wait_count postroom e2e "$E2E_WANT" "$(time_left)"; }
e2e_wait_postfix() { wait_count postfix - "$E2E_WANT" "$(time_left)"; }
for r in $(seq 1 "$ROUNDS"); do
    budget_ok || break
    echo "bench: e2e round $r" >&2
    base=$(pr_stat e2e)
    if [[ -n "$base" ]]; then
        E2E_WANT=$((base + N_E2E)) AFTER_CLIENT=e2e_wait_postroom
        measure e2e postroom "$SMTP_SOURCE" -s "$C" -m "$N_E2E" -l 1024 -f bench@example.test \
            -t e2e@example.test "$SMTP_ADDR"
        AFTER_CLIENT=""
        if ((RC == 0)) && [[ -n "$AFTER_OK" ]]; then
            record e2e postroom "$(div "$N_E2E" "$EL")" "$(div "$CPU_US" "$N_E2E")"
        else
            add_note "e2e|postroom" "round $r: not all delivered in time"
        fi
    fi
    if [[ -n "$PF_ADDR" ]]; then
        E2E_WANT=$(($(pf_maildir_count) + N_E2E)) AFTER_CLIENT=e2e_wait_postfix
        measure e2e postfix "$SMTP_SOURCE" -s "$C" -m "$N_E2E" -l 1024 -f bench@example.test \
            -t box@vmail.example.test "$PF_ADDR"
        AFTER_CLIENT=""
        if ((RC == 0)) && [[ -n "$AFTER_OK" ]]; then
            record e2e postfix "$(div "$N_E2E" "$EL")" "$(div "$CPU_US" "$N_E2E")"
        else
            add_note "e2e|postfix" "round $r: not all delivered in time"
        fi
    fi
done

# --- S4: 100 KiB, persistent (MB/s) --------------------------------------------------------------
for r in $(seq 1 "$ROUNDS"); do
    budget_ok || break
    echo "bench: 100k round $r" >&2
    for t in postroom postfix; do
        [[ $t == postfix && -z "$PF_ADDR" ]] && continue
        addr=$SMTP_ADDR rcpt=admin@example.test
        [[ $t == postfix ]] && addr=$PF_ADDR rcpt=sink@example.test
        measure big "$t" "$SMTP_SOURCE" -d -s "$C" -m "$N_BIG" -l 102400 -f bench@example.test \
            -t "$rcpt" "$addr"
        if ((RC == 0)); then
            record big "$t" "$(div "$(awk -v n="$N_BIG" 'BEGIN { print n * 102400 / 1e6 }')" "$EL")" \
                "$(div "$CPU_US" "$N_BIG")"
        fi
    done
done

# --- S5, S6: POP3 ---------------------------------------------------------------------------------
if budget_ok; then
    echo "bench: filling POP3 mailboxes (${#USERS[@]} × $POP_MSGS × $POP_SIZE B)" >&2
    TO_ARGS=() USER_ARGS=()
    for u in "${USERS[@]}"; do
        TO_ARGS+=(--to "$u@example.test")
        USER_ARGS+=(--user "$u:$PW")
    done
    bounded "$TMP/fill.json" "$TMP/fill.err" 120 "$LOADGEN" smtp --addr "$SMTP_ADDR" \
        --messages "$POP_MSGS" --size "$POP_SIZE" --concurrency "$POP_C" --reuse \
        --from bench@example.test "${TO_ARGS[@]}" --max-seconds 100
    FILLED=""
    for _ in $(seq 1 240); do
        S=$(timeout 30 "$LOADGEN" pop3 --addr "$POP_ADDR" "${USER_ARGS[@]}" --mode stat \
            --concurrency "$POP_C" --max-seconds 20 2>/dev/null || true)
        m=$(jget "$S" min_messages)
        if [[ -n "$m" ]] && ((m >= POP_MSGS)); then FILLED=1; break; fi
        sleep 0.5
    done
    [[ -n "$FILLED" ]] || add_note "retr|postroom" "mailboxes not full after 120 s (STAT: ${S:-none})"
    if [[ -n "$DV_ADDR" ]]; then
        for u in "${USERS[@]}"; do
            "$LOADGEN" maildir --dir "$TMP/dovecot/mail/$u/Maildir" --messages "$POP_MSGS" \
                --size "$POP_SIZE" --from bench@example.test --to "$u@example.test" >/dev/null
        done
        dv_chown
        # Warm-up: Dovecot builds its index and uidlist on the first access.
        timeout 60 "$LOADGEN" pop3 --addr "$DV_ADDR" "${USER_ARGS[@]}" --mode retr-all \
            --concurrency "$POP_C" --max-seconds 50 >/dev/null 2>&1 || true
    fi
    timeout 60 "$LOADGEN" pop3 --addr "$POP_ADDR" "${USER_ARGS[@]}" --mode retr-all \
        --concurrency "$POP_C" --max-seconds 50 >/dev/null 2>&1 || true
fi
for mode in retr login; do
    for r in $(seq 1 "$ROUNDS"); do
        budget_ok || break
        echo "bench: pop3 $mode round $r" >&2
        for t in postroom dovecot; do
            [[ $t == dovecot && -z "$DV_ADDR" ]] && continue
            addr=$POP_ADDR
            [[ $t == dovecot ]] && addr=$DV_ADDR
            if [[ $mode == retr ]]; then
                measure retr "$t" "$LOADGEN" pop3 --addr "$addr" "${USER_ARGS[@]}" --mode retr-all \
                    --repeat "$POP_REPEAT" --concurrency "$POP_C" --max-seconds "$(time_left)"
                o=$(cat "$OUTF")
                n=$(jget "$o" retrieved)
                [[ "$(jget "$o" errors)" == 0 ]] || add_note "retr|$t" "round $r: $(jget "$o" errors) errors"
                [[ -n "$n" ]] && ((n > 0)) && record retr "$t" "$(jget "$o" retr_per_sec)" "$(div "$CPU_US" "$n")"
            else
                measure login "$t" "$LOADGEN" pop3 --addr "$addr" "${USER_ARGS[@]}" --mode login-one \
                    --sessions "$POP_SESSIONS" --concurrency "$POP_C" --max-seconds "$(time_left)"
                o=$(cat "$OUTF")
                n=$(jget "$o" sessions)
                [[ "$(jget "$o" errors)" == 0 ]] || add_note "login|$t" "round $r: $(jget "$o" errors) errors"
                [[ -n "$n" ]] && ((n > 0)) && record login "$t" "$(jget "$o" sessions_per_sec)" "$(div "$CPU_US" "$n")"
            fi
        done
    done
done

# --- S7: accept into a mailbox holding BIG_BOX messages vs an empty one (Postroom only) ---------
if budget_ok; then
    echo "bench: filling the big mailbox with $BIG_BOX messages" >&2
    bounded "$TMP/bigfill.json" "$TMP/bigfill.err" 150 "$LOADGEN" smtp --addr "$SMTP_ADDR" \
        --messages "$BIG_BOX" --size 1024 --concurrency "$C" --reuse --from bench@example.test \
        --to big@example.test --max-seconds 120
    wait_count postroom big "$BIG_BOX" 120 || add_note "full|postroom" "big mailbox not full in time"
    add_note "full|postroom" "big mailbox before: $(pr_stat big) messages"
fi
for r in $(seq 1 "$ROUNDS"); do
    budget_ok || break
    echo "bench: full-mailbox round $r" >&2
    for t in empty full; do
        user=big
        [[ $t == empty ]] && user=${EMPTY_USERS[$((r - 1))]}
        smtp_source_run "mbox" "$t" "$SMTP_ADDR" "$user@example.test" "$N" 1024 -d
    done
done

# ---------------------------------------------------------------------------------------------
# Report.
cell() { # KEY TARGET DECIMALS -> "median rate"
    fmt "$(median ${VAL[$1|$2]:-})" "$3"
}
cpucell() { fmt "$(median ${CPU[$1|$2]:-})" 0; }
ratio() { # KEY A B -> median(A)/median(B)
    local a b
    a=$(median ${VAL[$1|$2]:-}) b=$(median ${VAL[$1|$3]:-})
    fmt "$(div "$a" "$b")" 2
}
verdict() { # RATIO GOAL -> met / NOT met / n/a
    awk -v r="$1" -v g="$2" 'BEGIN { if (r == "n/a" || r == "") print "n/a"; else if (r + 0 >= g) print "met"; else print "**not met**" }'
}
nrounds() { local v=(${VAL[$1|$2]:-}); echo "${#v[@]}"; }
notes() { # KEY TARGET...
    local out="" t
    for t in "${@:2}"; do
        [[ -n "${NOTE[$1|$t]:-}" ]] && out="${out:+$out; }$t: ${NOTE[$1|$t]}"
    done
    echo "$out"
}
LINES=()
line() { LINES+=("| $1 | $2 | $3 | $4 | $5 | $6 | $7 | $8 | $9 |"); }
cmp_row() { # LABEL KEY PEER PEERNAME UNIT DECIMALS GOAL
    local r
    r=$(ratio "$2" postroom "$3")
    line "$1" "$(cell "$2" postroom "$6") $5" "$(cpucell "$2" postroom)" "$4" \
        "$(cell "$2" "$3" "$6") $5" "$(cpucell "$2" "$3")" "**$r×**" "≥ $7× — $(verdict "$r" "$7")" \
        "rounds $(nrounds "$2" postroom)/$(nrounds "$2" "$3")$(n=$(notes "$2" postroom "$3"); [[ -n $n ]] && echo "; $n")"
}

KI=$((POP_SIZE / 1024))
cmp_row "SMTP accept 1 KiB, new connection per message, $C sessions (smtp-source)" smtp-new postfix "Postfix (discard)" msg/s 0 3
cmp_row "same vs smtp-sink (no-work limit)" smtp-new sink "smtp-sink" msg/s 0 0.4
cmp_row "SMTP accept 1 KiB, persistent, $C sessions (smtp-source -d)" smtp-persist postfix "Postfix (discard)" msg/s 0 3
r=$(ratio smtp-persist postroom sink)
line "same vs smtp-sink (no-work limit)" "$(cell smtp-persist postroom 0) msg/s" "$(cpucell smtp-persist postroom)" \
    "smtp-sink" "$(cell smtp-persist sink 0) msg/s" "$(cpucell smtp-persist sink)" "$r×" "—" "no goal"
cmp_row "accepted → in the mailbox, $N_E2E × 1 KiB, $C sessions" e2e postfix "Postfix → Maildir (virtual)" msg/s 0 2.5
cmp_row "SMTP 100 KiB, persistent, $C sessions" big postfix "Postfix (discard)" MB/s 1 2
cmp_row "POP3 RETR, ${#USERS[@]} users × $POP_MSGS × $KI KiB ×$POP_REPEAT passes, $POP_C clients" retr dovecot "Dovecot" RETR/s 0 2
cmp_row "POP3 login + RETR 1 + QUIT, $POP_C clients (µs per session)" login dovecot "Dovecot (default login)" sessions/s 0 20
r=$(ratio mbox full empty)
line "SMTP accept into a mailbox holding $BIG_BOX messages (persistent)" "$(cell mbox full 0) msg/s" "$(cpucell mbox full)" \
    "Postroom, empty mailbox" "$(cell mbox empty 0) msg/s" "$(cpucell mbox empty)" "**$r×**" "≥ 0.9× — $(verdict "$r" 0.9)" \
    "rounds $(nrounds mbox full)/$(nrounds mbox empty)$(n=$(notes mbox full empty); [[ -n $n ]] && echo "; $n")"
vd=$(awk -v x="$IDLE_RESULT" 'BEGIN { if (x == "") print "n/a"; else if (x + 0 < 64) print "met"; else print "**not met**" }')
line "$IDLE idle SMTP + $IDLE idle POP3 connections: Postroom total RSS" "${IDLE_RESULT:-n/a} MiB" "—" "—" "—" "—" "—" "< 64 MiB — $vd" "$IDLE_NOTE"
vd=$(awk -v x="$HUGE_RESULT" 'BEGIN { if (x == "") print "n/a"; else if (x + 0 < 60) print "met"; else print "**not met**" }')
line "one $((HUGE / 1000000)) MB message: Postroom RSS growth" "${HUGE_RESULT:-n/a} MB" "—" "—" "—" "—" "—" "< 60 MB — $vd" "$HUGE_NOTE"

echo
# What a server that has worked keeps once it is quiet (the argon2 threads free their memory after
# 10 s without a login; the heap is trimmed once the server has been quiet for 10 s).
RSS_END=$(rss_kib)
sleep 25
RSS_QUIET=$(rss_kib)

echo "## Postroom vs Postfix and Dovecot ($(date -u +%Y-%m-%dT%H:%M:%SZ), $NPROC CPUs, loopback)"
echo
echo "Machine: $NPROC × $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), $(awk '/^MemTotal:/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM; load average at the start $LOAD0."
echo "Peers: Postfix $(postconf -d -h mail_version 2>/dev/null || echo '?'), Dovecot $(dovecot --version 2>/dev/null | cut -d' ' -f1 || echo '?'), smtp-sink/smtp-source from the Postfix package."
echo
echo "Medians of $ROUNDS interleaved rounds. N=$N, N_E2E=$N_E2E, N_BIG=$N_BIG, POP_SESSIONS=$POP_SESSIONS; scenarios took $(($(date +%s) - START)) s."
echo
echo "| scenario | Postroom | CPU µs/unit | peer | peer | peer CPU µs/unit | Postroom/peer | goal | notes |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${LINES[@]}"
echo
echo "CPU µs/unit: utime+stime of the whole server process tree (Postfix and Dovecot: master and"
echo "every child, reaped ones included), from the client's start until the tree is idle again,"
echo "divided by messages, RETRs or sessions. Clients and servers share the same $NPROC CPUs."
echo "Postroom's RSS at the end: $(fmt "$(div "$RSS_END" 1024)" 1) MiB, after 25 s without work $(fmt "$(div "$RSS_QUIET" 1024)" 1) MiB (peak since the 50 MB message: $(fmt "$(div "$(hwm_kib)" 1024)" 1) MiB)."
echo "Per-round rates (msg/s etc.):"
for k in "${!VAL[@]}"; do echo "  $k:${VAL[$k]}   (CPU µs/unit:$(for x in ${CPU[$k]}; do printf ' %.0f' "$x"; done))"; done | sort

# Issue 16: what sender authentication costs per message, on one thread, in-process (no sockets:
# the inbound checks read DNS answers from a warm cache, as a busy server does).
echo
echo "## Sender authentication, CPU µs per message (one thread)"
echo
echo '```'
(cd "$(dirname "$0")/.." && timeout 600 cargo run --release -q -p sender-auth --example sign_cost && \
    timeout 600 cargo run --release -q -p sender-auth --example verify_cost) || echo "bench: the sender-auth cost examples failed" >&2
echo '```'
