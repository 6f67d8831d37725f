#!/usr/bin/env bash
# Kill the node of ringtrain@JOB.service with SIGKILL, KILLS times in a row, and check that
# systemd restarts it and that it gets back into a ring of MEMBERS (or more) and trains.
# Run as root on the device, with the unit already in a ring with its peers:
#   deploy/systemd/kill-check.sh JOB [KILLS=3] [MEMBERS=3] [PAUSE=30]
# For each kill it prints the journal's times: kill -> systemd started the new process ->
# the new process was in the ring ("in a ring of N"), then `ringtrain health` PAUSE seconds
# later. Exits 1 when a restart or a rejoin takes over 120 s or the node is not ready.
set -euo pipefail
job="$1"; kills="${2:-3}"; members="${3:-3}"; pause="${4:-30}"
unit="ringtrain@$job.service"
ringtrain="${RINGTRAIN:-/opt/ringtrain/bin/ringtrain}"
state="/run/ringtrain/$job/state.json"

minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
health() { "$ringtrain" health --state-file "$state" 2>&1 || true; }
main_pid() { systemctl show -p MainPID --value "$unit"; }
# The first journal line of this unit since $1 (epoch seconds) that matches $2, as "TIME LINE".
first_line() {
    journalctl -u "$unit" -o short-unix --no-pager --since "@$1" 2>/dev/null \
        | grep -m1 -E "$2" || true
}
wait_for() {  # wait_for WHAT SINCE REGEX: until the journal has a matching line (120 s)
    local line deadline=$((SECONDS + 120))
    while [ $SECONDS -lt $deadline ]; do
        line="$(first_line "$2" "$3")"
        if [ -n "$line" ]; then echo "$line"; return 0; fi
        sleep 0.2
    done
    echo "kill-check: no $1 within 120 s" >&2
    return 1
}

echo "before: $(health)"
for i in $(seq "$kills"); do
    old="$(main_pid)"
    killed="$(date +%s.%N)"
    systemctl kill -s KILL "$unit"
    started="$(wait_for restart "$killed" "systemd\[1\]: Started ")" || exit 1
    deadline=$((SECONDS + 120))
    while pid="$(main_pid)"; [ "$pid" = 0 ] || [ "$pid" = "$old" ]; do
        [ $SECONDS -lt $deadline ] || { echo "kill-check: no new process" >&2; exit 1; }
        sleep 0.2
    done
    joined="$(wait_for rejoin "$killed" \
        "\[$pid\]: .*in a ring of ([$members-9]|[1-9][0-9])")" || exit 1
    t_start="${started%% *}"; t_join="${joined%% *}"
    echo "kill $i: pid $old killed at $(date -u -d "@$killed" +%H:%M:%S.%1N);" \
        "restarted $(minus "$t_start" "$killed") s later (pid $pid); in the ring" \
        "$(minus "$t_join" "$t_start") s after that ($(minus "$t_join" "$killed") s after the kill)"
    echo "  ${joined#* }" | cut -c1-200
    sleep "$pause"
    now="$(health)"
    echo "  ${pause} s later: $now"
    case "$now" in ready:*) ;; *) echo "kill-check: not ready after kill $i" >&2; exit 1 ;; esac
done
echo "restarts: $(systemctl show -p NRestarts --value "$unit")"
