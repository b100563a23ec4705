#!/bin/sh
# pgcorral's entrypoint on Kubernetes: gives each pod a peer id and the list of its peers,
# runs pgcorral, keeps the list current and turns the pod's stop signal into a drain.
#
#   peers.sh pgcorral /etc/pgcorral/pgcorral.ini     run COMMAND... as pgcorral (the Deployment)
#   peers.sh --generate-only                          write the [peers] file once, print the id
#
# Peer id: the low 14 bits of the pod's IPv4 address (POD_IP, from the downward API), 16383
# when those bits are all 0. Every pod computes every other pod's id the same way from its
# address, so all of them agree without talking to each other. It is exported to pgcorral as
# PGCORRAL_PEER_ID and is fixed for the pod's life, as a pod's address is.
#
# Peers: the IPv4 addresses of the headless Service PEERS_SERVICE (getent ahostsv4, so the
# resolver, /etc/hosts and nsswitch.conf apply), this pod's own always included, written as
# pgcorral's [peers] section to PEERS_FILE, which pgcorral.ini reads with %include. Refreshed
# every PEERS_REFRESH seconds: when the list changed (a pod came or went), the file is
# replaced and pgcorral gets SIGHUP, which reloads [peers]. A change to any file named in
# RELOAD_ON_CHANGE (the mounted ConfigMap and Secret) also sends SIGHUP.
#
# Two addresses with the same low 14 bits would share a peer id:
# - one of them this pod's: the pod refuses to start (exit 1, with the addresses); its
#   container restarts with the same address and refuses again until the pod is deleted and
#   gets another one (README.md in this directory);
# - two other pods: that id is left out of the list (a warning names them), so cancel
#   requests for it are dropped instead of sent to the wrong pooler, unless the running file
#   already had one of the two addresses for it, which is then kept.
#
# Stop: the runtime's stop signal (SIGTERM, or SIGINT, which the repository's Dockerfile sets
# as STOPSIGNAL) reaches this script, PID 1. pgcorral is sent DRAIN_SIGNAL instead: TERM
# (SHUTDOWN WAIT_FOR_CLIENTS: stop accepting, serve the connected clients until they leave)
# by default, or INT (WAIT_FOR_SERVERS: let each client finish its transaction, then let it
# go). Clients of application pools rarely leave on their own, so after DRAIN_SECONDS
# pgcorral is sent SIGUSR1 (PAUSE: transactions under way finish, no new one starts) and
# PAUSE_SECONDS later SIGQUIT (exit now): the connections still open are closed between
# transactions rather than in the middle of one by the kubelet's SIGKILL. Keep
# preStop + DRAIN_SECONDS + PAUSE_SECONDS below terminationGracePeriodSeconds.
# SIGHUP, SIGUSR1 and SIGUSR2 sent to this script are passed on to pgcorral.
#
# Environment (names that start with PGCORRAL_ are pgcorral's settings, so none of these do):
#   POD_IP            this pod's IPv4 address (required)
#   PEERS_SERVICE     the headless Service's DNS name (required)
#   PEERS_PORT        the port the peers listen on (6432)
#   PEERS_POOL_SIZE   pool_size= of each peer line (unset: pgcorral's default_pool_size)
#   PEERS_FILE        the generated file (/run/pgcorral/peers.ini)
#   PEERS_REFRESH     seconds between refreshes (10)
#   PEERS_WAIT        at start, seconds to wait for this pod's address to show in the
#                     Service's DNS answer, so that the collision check sees the pods that
#                     came before it (30; the answer may lag by the cluster DNS's cache time)
#   RELOAD_ON_CHANGE  files whose change sends pgcorral SIGHUP (space-separated; none)
#   DRAIN_SIGNAL      TERM (default) or INT
#   DRAIN_SECONDS     seconds of drain before PAUSE (35)
#   PAUSE_SECONDS     seconds from PAUSE to exit (10)
#
# POSIX sh. Besides sh it runs getent (glibc), sed, grep, cmp and coreutils (sort, cksum,
# date, sleep, mv, mkdir, dirname, cat), all in Debian's essential set and so in debian-slim.

set -u

PEERS_PORT=${PEERS_PORT:-6432}
PEERS_POOL_SIZE=${PEERS_POOL_SIZE:-}
PEERS_FILE=${PEERS_FILE:-/run/pgcorral/peers.ini}
PEERS_REFRESH=${PEERS_REFRESH:-10}
PEERS_WAIT=${PEERS_WAIT:-30}
RELOAD_ON_CHANGE=${RELOAD_ON_CHANGE:-}
DRAIN_SIGNAL=${DRAIN_SIGNAL:-TERM}
DRAIN_SECONDS=${DRAIN_SECONDS:-35}
PAUSE_SECONDS=${PAUSE_SECONDS:-10}

# The largest peer id pgcorral (and PgBouncer) accept: ids are the address's low 14 bits.
MAX_PEER_ID=16383

say() { echo "peers.sh: $*" >&2; }
die() {
    say "$*"
    exit 1
}

# peer_id_of ADDRESS: prints the peer id of a dotted IPv4 address; fails on anything else.
peer_id_of() {
    case $1 in
    *[!0-9.]* | '' | .* | *. | *..*) return 1 ;;
    esac
    old_ifs=$IFS
    IFS=.
    # shellcheck disable=SC2086 # split on the dots on purpose
    set -- $1
    IFS=$old_ifs
    [ $# -eq 4 ] || return 1
    for octet in "$@"; do
        # Leading zeros would read as octal in $(( )); getent and the kubelet write none.
        case $octet in 0?*) return 1 ;; esac
        [ "$octet" -le 255 ] || return 1
    done
    id=$((($3 * 256 + $4) % (MAX_PEER_ID + 1)))
    [ "$id" -ne 0 ] || id=$MAX_PEER_ID
    echo "$id"
}

# resolve: the Service's IPv4 addresses, one a line, sorted; fails when the lookup does.
resolve() {
    answer=$(getent ahostsv4 "$PEERS_SERVICE") || return 1
    printf '%s\n' "$answer" | while read -r address _; do
        if peer_id_of "$address" >/dev/null; then echo "$address"; fi
    done | sort -u
}

# write_peers OUT ADDRESSES: writes the [peers] file for ADDRESSES (one a line, this pod's
# added) to OUT, keeping a colliding id's entry from the running PEERS_FILE when it has one.
# Sets OWN_COLLISION to the other addresses that have this pod's id ("" when none).
write_peers() {
    out=$1
    pairs=$(
        printf '%s\n%s\n' "$2" "$POD_IP" | while read -r address; do
            [ -n "$address" ] || continue
            echo "$(peer_id_of "$address") $address"
        done | sort -u | sort -n -k1,1
    )
    OWN_COLLISION=
    {
        echo "; Generated by peers.sh from the addresses of $PEERS_SERVICE; do not edit."
        echo "[peers]"
        group_id=
        group=
        # A sentinel line closes the last group.
        while read -r id address; do
            if [ "$id" != "$group_id" ] && [ -n "$group_id" ]; then
                emit_group "$group_id" "$group"
                group=
            fi
            group_id=$id
            group="$group${group:+ }$address"
        done <<EOF
$pairs
0 end
EOF
    } >"$out"
}

# emit_group ID "ADDRESS..." (inside write_peers): the [peers] line for one id.
emit_group() {
    group_id_=$1
    # shellcheck disable=SC2086 # the addresses, split on spaces
    set -- $2
    if [ $# -eq 1 ]; then
        peer_line "$group_id_" "$1"
        return
    fi
    if contains "$(printf '%s\n' "$@")" "$POD_IP"; then
        for a_ in "$@"; do
            [ "$a_" = "$POD_IP" ] || OWN_COLLISION="$OWN_COLLISION${OWN_COLLISION:+ }$a_"
        done
        peer_line "$group_id_" "$POD_IP"
        return
    fi
    previous_=
    if [ -f "$PEERS_FILE" ]; then
        previous_=$(sed -n "s/^$group_id_ = host=\([0-9.]*\) .*/\1/p" "$PEERS_FILE")
    fi
    if [ -n "$previous_" ] && contains "$(printf '%s\n' "$@")" "$previous_"; then
        say "warning: peer id $group_id_ is shared by $*; keeping $previous_, which had it before"
        peer_line "$group_id_" "$previous_"
    else
        say "warning: peer id $group_id_ is shared by $* (the same low 14 bits); left out, so cancel requests for it are dropped"
    fi
}

# contains LINES LINE: whether LINE is one of LINES.
contains() {
    case "
$1
" in
    *"
$2
"*) return 0 ;;
    esac
    return 1
}

peer_line() {
    echo "$1 = host=$2 port=$PEERS_PORT${PEERS_POOL_SIZE:+ pool_size=$PEERS_POOL_SIZE}"
}

# generate: writes PEERS_FILE from a fresh lookup; returns 2 when the lookup failed (the file
# is then left as it was), 3 when another address has this pod's id (the file is written).
generate() {
    addresses=$(resolve) || return 2
    write_peers "$PEERS_FILE.new" "$addresses"
    if ! cmp -s "$PEERS_FILE.new" "$PEERS_FILE" 2>/dev/null; then
        mv -f "$PEERS_FILE.new" "$PEERS_FILE"
        CHANGED=1
    else
        rm -f "$PEERS_FILE.new"
    fi
    [ -z "$OWN_COLLISION" ] || return 3
}

# first_generation: at start, waits up to PEERS_WAIT seconds for this pod's address in the
# Service's answer, then writes the file (this pod alone if the lookup still fails), or exits
# when another address has this pod's id.
first_generation() {
    deadline=$(($(date +%s) + PEERS_WAIT))
    while :; do
        if addresses=$(resolve) && contains "$addresses" "$POD_IP"; then
            break
        fi
        [ "$(date +%s)" -lt "$deadline" ] || break
        sleep 1
    done
    if [ -z "$addresses" ]; then
        say "warning: $PEERS_SERVICE does not resolve; starting with this pod alone in [peers]"
    elif ! contains "$addresses" "$POD_IP"; then
        say "warning: $POD_IP is not among the addresses of $PEERS_SERVICE after ${PEERS_WAIT}s"
    fi
    write_peers "$PEERS_FILE.new" "$addresses"
    if [ -n "$OWN_COLLISION" ]; then
        rm -f "$PEERS_FILE.new"
        die "refusing to start: this pod's address $POD_IP has the same low 14 bits as $OWN_COLLISION (listed by $PEERS_SERVICE), so they would share peer id $OWN_ID and cancel requests could reach the wrong pooler; delete this pod so that it gets another address (deploy/kubernetes/README.md)"
    fi
    mv -f "$PEERS_FILE.new" "$PEERS_FILE"
    say "peer id $OWN_ID ($POD_IP); $(grep -c ' = host=' "$PEERS_FILE") peers in $PEERS_FILE"
}

watched_sum() {
    [ -n "$RELOAD_ON_CHANGE" ] || return 0
    # shellcheck disable=SC2086 # a list of paths
    cat $RELOAD_ON_CHANGE 2>/dev/null | cksum
}

# refresher PID: every PEERS_REFRESH seconds, regenerates the file and sends PID SIGHUP when
# it or a watched file changed. Runs in the background for the pod's life.
refresher() {
    sum=$(watched_sum)
    while sleep "$PEERS_REFRESH"; do
        CHANGED=
        generate
        case $? in
        2) say "warning: looking up $PEERS_SERVICE failed; keeping the peers as they were" ;;
        3) say "warning: $OWN_COLLISION now has this pod's peer id $OWN_ID too; cancel requests for it may reach the wrong pooler until one of the pods is deleted" ;;
        esac
        now=$(watched_sum)
        if [ "$now" != "$sum" ]; then
            sum=$now
            CHANGED=1
            say "configuration files changed"
        fi
        if [ -n "$CHANGED" ]; then
            say "reloading pgcorral ($(grep -c ' = host=' "$PEERS_FILE") peers)"
            kill -s HUP "$1" 2>/dev/null || return
        fi
    done
}

[ -n "${POD_IP:-}" ] || die "POD_IP is not set (give it the pod's status.podIP through the downward API)"
[ -n "${PEERS_SERVICE:-}" ] || die "PEERS_SERVICE is not set (the headless Service that lists the pods)"
OWN_ID=$(peer_id_of "$POD_IP") || die "POD_IP=$POD_IP is not an IPv4 address: peer ids are derived from IPv4 addresses"
case $DRAIN_SIGNAL in
TERM | INT) ;;
*) die "DRAIN_SIGNAL=$DRAIN_SIGNAL: expected TERM or INT" ;;
esac
mkdir -p "$(dirname "$PEERS_FILE")" || die "cannot create the directory of $PEERS_FILE"

if [ "${1:-}" = "--generate-only" ]; then
    first_generation
    echo "PGCORRAL_PEER_ID=$OWN_ID"
    exit 0
fi
[ $# -gt 0 ] || die "usage: peers.sh COMMAND [ARG...] | peers.sh --generate-only"

first_generation
PGCORRAL_PEER_ID=$OWN_ID
export PGCORRAL_PEER_ID
"$@" &
child=$!
refresher "$child" &
refresher_pid=$!
escalator_pid=

# shellcheck disable=SC2317 # called from the traps below
stop() {
    if [ -n "$escalator_pid" ]; then
        # A second stop signal: exit now, as pgcorral does on a second shutdown request.
        kill -s QUIT "$child" 2>/dev/null
        return
    fi
    say "got SIG$1: sending pgcorral SIG$DRAIN_SIGNAL; PAUSE after ${DRAIN_SECONDS}s, exit ${PAUSE_SECONDS}s later"
    kill -s "$DRAIN_SIGNAL" "$child" 2>/dev/null
    (
        sleep "$DRAIN_SECONDS"
        say "drain time is up: sending pgcorral SIGUSR1 (PAUSE)"
        kill -s USR1 "$child" 2>/dev/null || exit 0
        sleep "$PAUSE_SECONDS"
        say "pause time is up: sending pgcorral SIGQUIT"
        kill -s QUIT "$child" 2>/dev/null
    ) &
    escalator_pid=$!
}
trap 'stop TERM' TERM
trap 'stop INT' INT
trap 'kill -s QUIT "$child" 2>/dev/null' QUIT
trap 'kill -s HUP "$child" 2>/dev/null' HUP
trap 'kill -s USR1 "$child" 2>/dev/null' USR1
trap 'kill -s USR2 "$child" 2>/dev/null' USR2

# wait returns early whenever a trapped signal arrives; pgcorral has exited once it is gone.
while :; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
done
kill "$refresher_pid" ${escalator_pid:+"$escalator_pid"} 2>/dev/null
say "pgcorral exited with status $status"
exit "$status"
