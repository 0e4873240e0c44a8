#!/usr/bin/env bash
# A real single-machine Slurm for tests and demos: munge, MariaDB, slurmdbd, slurmctld and two slurmd
# (virtual nodes node1/node2, 8 fake GPUs each), everything on 127.0.0.1, state outside the repo.
#
#   slurm/local_cluster.sh up       install (first time, apt) and start; a no-op when already healthy
#   slurm/local_cluster.sh status   exit 0 when every daemon runs and both nodes are usable
#   slurm/local_cluster.sh env      print `export SLURM_CONF=...` for clients: eval "$(... env)"
#   slurm/local_cluster.sh down     stop everything it started (and their jobs), delete the state
#
# Environment: SPARROW_SLURM_STATE (default /tmp/sparrow-slurm), SPARROW_SLURM_PORT_BASE (default 16800).
# Exit status 3 means Slurm cannot be installed on this machine (tests skip on it); others are errors.
set -euo pipefail

STATE=${SPARROW_SLURM_STATE:-/tmp/sparrow-slurm}
PORT_BASE=${SPARROW_SLURM_PORT_BASE:-16800}
CTLD_PORT=$((PORT_BASE + 17))
DBD_PORT=$((PORT_BASE + 19))
MYSQL_PORT=$((PORT_BASE + 6))
SLURMD_PORT1=$((PORT_BASE + 1))
SLURMD_PORT2=$((PORT_BASE + 2))
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=$STATE/etc/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server gcc)
BINARIES=(slurmctld slurmd slurmdbd sbatch sacct sacctmgr munged mungekey mariadbd mariadb-install-db gcc)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd-node1 slurmd-node2)

export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin
export DEBIAN_FRONTEND=noninteractive

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }
unavailable() { log "Slurm unavailable: $*"; exit 3; }
# Every client call is bounded: a wedged controller must fail a test, not hang it.
client() { timeout 20 "$@"; }

install_packages() {
    local missing=()
    for bin in "${BINARIES[@]}"; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    [ "$(id -u)" -eq 0 ] || unavailable "not root and ${missing[*]} missing"
    command -v apt-get >/dev/null 2>&1 || unavailable "no apt-get and ${missing[*]} missing"
    timeout 600 apt-get update -qq </dev/null >&2 || unavailable "apt-get update failed"
    # policy-rc.d keeps the packages' init scripts from starting system-wide daemons on install.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && created_policy=1; fi
    timeout 900 apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" </dev/null >&2 \
        || { [ $created_policy -eq 1 ] && rm -f $policy; unavailable "apt-get install failed"; }
    [ $created_policy -eq 1 ] && rm -f $policy
    return 0
}

pid_of() { cat "$STATE/run/$1.pid" 2>/dev/null || true; }
alive() { local pid; pid=$(pid_of "$1"); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.5
    done
    log "$what ready"
}

render() {  # render TEMPLATE OUTPUT
    sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@CPUS@|$(nproc)|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@MYSQL_PORT@|$MYSQL_PORT|g" \
        -e "s|@SLURMD_PORT1@|$SLURMD_PORT1|g" -e "s|@SLURMD_PORT2@|$SLURMD_PORT2|g" \
        -e "s|@DB_PASS@|$DB_PASS|g" "$HERE/templates/$1" >"$2"
}

# A node that serves jobs: idle, running them, finishing them, or planned by the backfill scheduler for
# a pending one (a requeued job waiting on its begin time), with or without a state flag (idle-).
nodes_ready() {
    local states
    states=$(client sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    [ "$(grep -cE '^node[12] (idle|mix|alloc|comp|plnd)' <<<"$states")" -eq 2 ]
}

healthy() {
    [ -f "$CONF" ] || return 1
    for daemon in "${DAEMONS[@]}"; do alive "$daemon" || return 1; done
    # A controller busy with a job's end can miss one sinfo: ask a few times before restarting it all.
    wait_for 15 "nodes node1/node2" nodes_ready
}

start() {
    mkdir -p "$STATE"/{etc,run,log,lib,dev,ctld,slurmd,munge,mysql}
    chmod 700 "$STATE"
    DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    for i in 0 1 2 3 4 5 6 7; do ln -sf /dev/null "$STATE/dev/gpu$i"; done
    gcc -shared -fPIC -O2 -o "$STATE/lib/bind_loopback.so" "$HERE/bind_loopback.c" -ldl \
        || die "cannot compile the bind shim"
    render slurm.conf.in "$CONF"
    render gres.conf.in "$STATE/etc/gres.conf"
    render slurmdbd.conf.in "$STATE/etc/slurmdbd.conf"
    render task_prolog.sh.in "$STATE/etc/task_prolog.sh"
    chmod 600 "$STATE/etc/slurmdbd.conf"
    chmod 755 "$STATE/etc/task_prolog.sh"
    : >"$STATE/etc/plugstack.conf"
    # The marker lets `down` find every process this cluster started (daemons, slurmstepd, jobs).
    export SPARROW_SLURM_STATE=$STATE
    local preload="LD_PRELOAD=$STATE/lib/bind_loopback.so"

    mungekey -c -f -k "$STATE/munge/munge.key" 2>/dev/null \
        || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1 count=1024 2>/dev/null
    chmod 400 "$STATE/munge/munge.key"
    # --force: the state dir lives under world-writable /tmp, which munged's path checks reject.
    munged --force --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" 9>&-
    wait_for 20 munged test -S "$STATE/munge/munge.socket" || die "munged did not start"

    mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root --skip-test-db \
        >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $STATE/log)"
    setsid mariadbd --no-defaults --datadir="$STATE/mysql" --user=root --bind-address=127.0.0.1 \
        --port="$MYSQL_PORT" --socket="$STATE/run/mysqld.sock" --pid-file="$STATE/run/mariadbd.pid" \
        --log-error="$STATE/log/mariadb.log" --skip-name-resolve --innodb-buffer-pool-size=64M \
        --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 9>&- &
    local sql=(mariadb --no-defaults --socket="$STATE/run/mysqld.sock" -u root)
    wait_for 60 mariadbd timeout 5 "${sql[@]}" -e 'SELECT 1' || die "mariadbd did not start"
    timeout 20 "${sql[@]}" -e "CREATE DATABASE IF NOT EXISTS slurm_acct;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct.* TO 'slurm'@'127.0.0.1';" || die "cannot create the accounting database"

    env "$preload" slurmdbd </dev/null 9>&-
    wait_for 60 slurmdbd client sacctmgr -n list cluster || die "slurmdbd did not start (see $STATE/log)"
    client sacctmgr -i add cluster sparrow >/dev/null
    client sacctmgr -i add account sparrow Cluster=sparrow Description=sparrow Organization=sparrow >/dev/null
    client sacctmgr -i add user root Account=sparrow >/dev/null

    env "$preload" slurmctld -f "$CONF" </dev/null 9>&-
    wait_for 30 slurmctld client scontrol ping || die "slurmctld did not start (see $STATE/log)"
    for node in node1 node2; do
        mkdir -p "$STATE/slurmd/$node"
        env "$preload" slurmd -f "$CONF" -N "$node" </dev/null 9>&-
    done
    wait_for 60 "nodes node1/node2" nodes_ready || die "nodes did not become idle: $(client sinfo -N 2>&1)"
}

# Processes started by this cluster carry SPARROW_SLURM_STATE=$STATE or the shim from $STATE.
own_pids() {
    local pid
    for env_file in /proc/[0-9]*/environ; do
        pid=${env_file#/proc/}; pid=${pid%/environ}
        [ "$pid" = $$ ] && continue
        { tr '\0' '\n' <"$env_file"; } 2>/dev/null \
            | grep -qxF -e "SPARROW_SLURM_STATE=$STATE" -e "LD_PRELOAD=$STATE/lib/bind_loopback.so" \
            && echo "$pid"
    done
    for daemon in "${DAEMONS[@]}"; do pid_of "$daemon"; done
}

# A pid still runs when it exists and is not a zombie (reaping is the parent's business).
running() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }
live() { while read -r p; do if [ -n "$p" ] && running "$p"; then echo "$p"; fi; done; }

stop() {
    local pids
    # Daemons first, in reverse start order, so nothing restarts a step while we stop it.
    pids=$(own_pids | sort -u | live)
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        pid=$(pid_of "${DAEMONS[$i]}")
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for _ in $(seq 1 60); do
        # The pids found before the kill stay watched: daemons delete their pid files on the way out.
        pids=$( (echo "$pids"; own_pids) | sort -u | live)
        [ -z "$pids" ] && break
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        sleep 0.25
    done
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    rm -rf "$STATE"
}

status() {
    local ok=0
    for daemon in "${DAEMONS[@]}"; do
        if alive "$daemon"; then echo "$daemon: running (pid $(pid_of "$daemon"))"; else echo "$daemon: stopped"; ok=1; fi
    done
    if [ -f "$CONF" ]; then client sinfo -N -o '%N %t %G' 2>&1 || ok=1; fi
    nodes_ready || ok=1
    return $ok
}

main() {
    local cmd=${1:-}
    case "$cmd" in
        up | down | status | env) ;;
        *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
    esac
    if [ "$cmd" = env ]; then echo "export SLURM_CONF=$CONF"; return 0; fi
    # One caller at a time (daemons get fd 9 closed, so they never hold the lock).: two test sessions starting the cluster together must not race.
    mkdir -p "$(dirname "$STATE")"
    exec 9>"$STATE.lock"
    timeout 600 flock 9 || die "another local_cluster.sh holds $STATE.lock"
    case "$cmd" in
        up)
            install_packages
            [ "$(id -u)" -eq 0 ] || unavailable "the daemons need root (slurmd switches users)"
            if healthy; then log "already up (SLURM_CONF=$CONF)"; return 0; fi
            stop  # whatever is half up goes, with its state: job ids and the accounting DB restart together
            start
            log "up: export SLURM_CONF=$CONF"
            ;;
        down) stop; log "down" ;;
        status) status ;;
    esac
}

main "$@"
