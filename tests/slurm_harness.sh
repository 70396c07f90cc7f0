#!/usr/bin/env bash
# A real single-node Slurm on localhost for the launcher tests, from Debian's packages
# (slurmctld slurmd slurm-client). Needs root: it writes /etc/slurm/slurm.conf and starts
# the two daemons, which daemonise; `stop` ends them by their pid files.
#
#   tests/slurm_harness.sh start    # idempotent: returns at once when a controller answers
#   tests/slurm_harness.sh stop     # stops only daemons this harness started
#   tests/slurm_harness.sh status
#
# The recipe (auth/none, no cgroups, no accounting) is ../shared/slurm's, verified on
# Debian 12 with Slurm 22.05. SlurmctldHost/NodeName must be the machine's real hostname.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CONF=/etc/slurm/slurm.conf
RUN=/run/slurm
MARK="$RUN/l2w-harness"            # written at start: "these daemons are ours"
WAIT_S=${L2W_SLURM_START_TIMEOUT:-30}

die() { echo "slurm_harness: $*" >&2; exit 1; }

controller_answers() { timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; }

node_idle() { timeout 5 sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

start() {
    command -v sbatch >/dev/null || die "sbatch not found: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client"
    if controller_answers && node_idle; then
        echo "slurm_harness: a Slurm controller already answers; using it"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "must run as root (writes $CONF, starts slurmctld/slurmd)"
    [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] || die "slurmctld/slurmd not installed"
    local host
    host="$(hostname)"
    [ -n "$host" ] && [ "$host" != localhost ] || die "the machine needs a real hostname, got '$host'"
    mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$RUN" /etc/slurm
    chown slurm:slurm /var/spool/slurmctld /var/log/slurm
    chmod 1777 "$RUN"
    local cpus mem_mb
    cpus="$(getconf _NPROCESSORS_ONLN)"  # not nproc: it honours OMP_NUM_THREADS
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    sed -e "s/@HOSTNAME@/$host/g" -e "s/@CPUS@/$cpus/g" -e "s/@MEMORY_MB@/$mem_mb/g" \
        "$HERE/slurm/slurm.conf.in" > "$CONF"
    # A previous run's saved state (jobs, node state) would only get in the way.
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
    /usr/sbin/slurmctld
    /usr/sbin/slurmd
    echo "$host" > "$MARK"
    local t=0
    until controller_answers && node_idle; do
        sleep 0.5
        t=$((t + 1))
        if [ "$t" -ge $((WAIT_S * 2)) ]; then
            tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
            die "Slurm did not come up within ${WAIT_S}s (logs above)"
        fi
    done
    echo "slurm_harness: Slurm up on $host: $(sinfo -h -o '%P %D %T' | tr '\n' ' ')"
}

stop_daemon() {
    local pidfile="$RUN/$1.pid"
    [ -f "$pidfile" ] || return 0
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

stop() {
    if [ ! -f "$MARK" ]; then
        echo "slurm_harness: no harness-started Slurm to stop"
        return 0
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    rm -f "$MARK"
    echo "slurm_harness: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) if controller_answers; then scontrol ping; sinfo; else echo "no Slurm controller answers"; exit 1; fi ;;
    *) die "usage: $0 start|stop|status" ;;
esac
