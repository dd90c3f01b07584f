#!/usr/bin/env bash
# Where a gateway's CPU per new connection goes: runs the load bench's
# connection load through sluice and HAProxy (one round each, in turn),
# records each gateway with `perf record -g` while its load runs, and
# prints, per gateway, its CPU µs per connection (from the bench) split by
# system call (the kernel's `__x64_sys_*` entry points, their callees
# included) and by user-space function (self time).
#
#   sudo -E bash benches/load/profile.sh            # about 2 minutes
#   SECONDS_PER_TARGET=20 sudo -E bash benches/load/profile.sh
#
# Needs root, perf (linux-perf) and what the load bench needs.
set -euo pipefail

window=${SECONDS_PER_TARGET:-12}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cd "$(dirname "$0")/../.."

cargo bench --bench load --no-run >/dev/null 2>&1
cargo bench --bench load -- --rounds 1 --warmup 2 --seconds "$window" \
    --targets sluice,haproxy --only rate >"$out/bench.txt" 2>&1 &
bench=$!

# Attaches perf to the first process matching $2 for a part of the window.
record() {
    local name=$1 pattern=$2 pid=""
    for _ in $(seq 600); do
        pid=$(pgrep -f "$pattern" | head -n1 || true)
        [[ -n $pid ]] && break
        sleep 0.1
    done
    if [[ -z $pid ]]; then
        echo "profile: $name did not start" >&2
        return 1
    fi
    # Past the warm-up, inside the measured window.
    sleep 3
    perf record -q -F 4000 -g -p "$pid" -o "$out/$name.data" -- sleep $((window - 4)) \
        >/dev/null 2>&1
}
record sluice '[s]luice serve --config'
record haproxy '[h]aproxy -db -f'
wait "$bench"

us_per_conn() {
    grep -F "gateway CPU µs per new connection | $1 |" "$out/bench.txt" |
        awk -F'|' '{gsub(/ /, "", $4); print $4}'
}

for name in sluice haproxy; do
    us=$(us_per_conn "$name")
    echo
    echo "## $name: ${us} µs of CPU per new connection (under perf)"
    echo
    echo "| system call | share | µs per connection |"
    echo "|---|---:|---:|"
    perf report -i "$out/$name.data" --children --sort sym -g none 2>/dev/null |
        awk -v us="$us" '$4 ~ /^__x64_sys_/ {
            gsub(/%/, "", $1); name = $4; sub(/^__x64_sys_/, "", name);
            printf "| %s | %.1f%% | %.1f |\n", name, $1, $1 * us / 100 }' | head -n 14
    echo
    echo "| user space (self) | share | µs per connection |"
    echo "|---|---:|---:|"
    perf report -i "$out/$name.data" --no-children --sort dso,sym -g none 2>/dev/null |
        awk -v us="$us" '/%/ && $2 !~ /kernel/ && $1 !~ /^#/ {
            share = $1; gsub(/%/, "", share); total += share;
            if (n < 10) { $1 = ""; $3 = ""; printf "| %s | %.1f%% | %.1f |\n", $0, share, share * us / 100; n++ } }
            END { printf "| all user space | %.1f%% | %.1f |\n", total, total * us / 100 }'
done
