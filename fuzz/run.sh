#!/usr/bin/env bash
# Fuzz Postroom's parsers and session state machines on stable Rust (cargo-fuzz, libFuzzer,
# no sanitizer). Usage, from anywhere:
#
#   bash fuzz/run.sh                 # every target, FUZZ_SECONDS (default 60) each, in turn
#   FUZZ_SECONDS=180 bash fuzz/run.sh smtp_session data_reader
#
# First replays fuzz/regressions/TARGET/* (inputs that once failed) through each target, then
# fuzzes it with corpus fuzz/corpus/TARGET (kept between runs, not in git) plus the seeds in
# fuzz/seeds/TARGET. Prints executions and findings per target; a finding is a crash, a
# timeout (one input running longer than FUZZ_TIMEOUT seconds) or an out-of-memory, written
# under fuzz/artifacts/TARGET/. Exits 1 if anything failed.
set -uo pipefail

cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
ALL_TARGETS=(smtp_command address data_reader chunk reply_parser sasl pop3_session smtp_session mime_scan config)
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL_TARGETS[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 1
fi

echo "== building fuzz targets"
cargo fuzz build --sanitizer none || exit 1
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN_DIR=fuzz/target/$TRIPLE/release

max_len() {
    case $1 in
        mime_scan) echo 65536 ;;
        pop3_session | smtp_session) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

dict() {
    case $1 in
        smtp_command | address | smtp_session | data_reader | chunk) echo fuzz/dicts/smtp.dict ;;
        pop3_session) echo fuzz/dicts/pop3.dict ;;
        mime_scan) echo fuzz/dicts/mime.dict ;;
        config) echo fuzz/dicts/toml.dict ;;
        *) echo "" ;;
    esac
}

failed=0
summary=()
for t in "${TARGETS[@]}"; do
    if [ ! -x "$BIN_DIR/$t" ]; then
        echo "unknown target $t (known: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "fuzz/seeds/$t"
    log=fuzz/artifacts/$t/last-run.log

    # 1. Known failures: each must now pass.
    regressions="ok"
    if compgen -G "fuzz/regressions/$t/*" >/dev/null; then
        n=0 bad=0
        for f in fuzz/regressions/"$t"/*; do
            n=$((n + 1))
            if ! timeout 60 "$BIN_DIR/$t" -timeout="$FUZZ_TIMEOUT" -rss_limit_mb="$FUZZ_RSS_MB" "$f" >"$log.regression" 2>&1; then
                bad=$((bad + 1))
                echo "   REGRESSION still fails: $f (output: $log.regression)"
            fi
        done
        regressions="$((n - bad))/$n pass"
        [ "$bad" -gt 0 ] && failed=1
    else
        regressions="none"
    fi

    # 2. Fuzz for FUZZ_SECONDS; `timeout` is a backstop should libFuzzer not stop by itself.
    before=$(find "fuzz/artifacts/$t" -type f ! -name '*.log*' | sort)
    echo "== $t: fuzzing ${FUZZ_SECONDS}s"
    d=$(dict "$t")
    timeout --kill-after=30 $((FUZZ_SECONDS + 120)) \
        cargo fuzz run --sanitizer none "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout="$FUZZ_TIMEOUT" -rss_limit_mb="$FUZZ_RSS_MB" \
        -max_len="$(max_len "$t")" -print_final_stats=1 ${d:+-dict=$d} >"$log" 2>&1
    rc=$?
    after=$(find "fuzz/artifacts/$t" -type f ! -name '*.log*' | sort)
    new=$(comm -13 <(echo "$before") <(echo "$after") | grep -v '^$' || true)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ -z "$execs" ]; then
        # Cut short by a finding: the last status line says how far it got.
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    fi
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    findings=$(echo -n "$new" | grep -c . || true)
    if [ "$rc" -ne 0 ] && [ "$findings" -eq 0 ]; then
        findings="? (exit $rc, see $log)"
        failed=1
    elif [ "$findings" -gt 0 ]; then
        failed=1
    fi
    line=$(printf '%-14s executions=%-11s cov=%-6s corpus=%-6s regressions=%-9s findings=%s' \
        "$t" "${execs:-?}" "${cov:-?}" "$corpus" "$regressions" "$findings")
    echo "$line"
    for f in $new; do
        echo "   finding: $f"
        grep -m1 -E "panicked at|ERROR: libFuzzer" "$log" | sed 's/^/     /'
    done
    summary+=("$line")
done

echo
echo "== fuzz summary (${FUZZ_SECONDS}s per target)"
printf '%s\n' "${summary[@]}"
exit $failed
