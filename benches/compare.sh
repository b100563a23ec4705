#!/usr/bin/env bash
# pgbench comparison of direct PostgreSQL, Debian's PgBouncer and pgcorral:
# the project's performance report. Prints a Markdown table of median tps and
# latency per workload. See benches/README.md.
#
#   benches/compare.sh                       # RUNS=3 DURATION=10 SCALE=10
#   PGCORRAL=/path/to/pgcorral RUNS=5 benches/compare.sh
#   BASELINE=/path/to/older/pgcorral benches/compare.sh   # old and new build in one sitting
#
# Env: RUNS, DURATION (s per pgbench run), SCALE, PGCORRAL (binary; default:
# cargo build --release), AUTH (md5|trust, default md5), ONLY (regex on
# workload names), RAW (file to append per-run results to), PG_BIN, SCRAPE (1:
# while pgbench runs, scrape each pooler every second as monitoring would:
# pgcorral's /metrics, PgBouncer's console SHOW POOLS and SHOW STATS), BASELINE (a
# second pgcorral binary run beside the first on every pgcorral row, with a
# pgcorral/baseline column: a change's cost measured in the same sitting), PROFILE (a
# directory: each pooler run is recorded with `perf record -g` there, and its hottest
# symbols written to PROFILE/<row>.<target>.txt).
#
# A second table gives each pooler's CPU per transaction (user and system time of the
# daemon process, all threads, from /proc/<pid>/stat, over the transactions pgbench
# counted): the budget that stays when CPUs get faster.
set -euo pipefail

# One line per table row: "name|pgbench args|targets[|conninfo]". -T, -n and the
# connection options are added by run_pgbench; the optional conninfo is added to the
# database name (every other run is plaintext: PGSSLMODE=disable).
WORKLOADS=(
  "select-only|-S -c 50 -j 2|direct pgbouncer pgcorral"
  "tpcb-like|-c 50 -j 2|direct pgbouncer pgcorral"
  "select-only, new connection per tx|-S -C -c 20 -j 2|direct pgbouncer pgcorral"
  # 1,000 clients queueing for 20 servers; PostgreSQL alone cannot take 1,000 connections.
  "select-only, 1000 clients|-S -c 1000 -j 2|pgbouncer pgcorral"
  # Named prepared statements in transaction mode (PgBouncer >= 1.21; Debian's 1.18 fails it).
  "select-only, prepared|-M prepared -S -c 50 -j 2|direct pgbouncer pgcorral"
  # Client TLS: both poolers serve the same certificate; the server side stays plaintext.
  "select-only, client TLS|-S -c 50 -j 2|pgbouncer pgcorral|sslmode=require"
  # Large results: four 10 MB rows (stored uncompressed), selected at random by 4 clients.
  "select 10 MB rows|-f @BIGROWS@ -c 4 -j 2|direct pgbouncer pgcorral"
  # Scale-out: two processes sharing the port with so_reuseport (pool 10 each), against one
  # process (pool 20): PgBouncer's single thread, and pgcorral with workers = 1 and peering
  # against one pgcorral with a worker per core. Reported in a table of its own.
  "select-only, two processes|-S -c 50 -j 2|pgbouncer pgbouncer-x2 pgcorral pgcorral-x2"
)

RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
SCALE=${SCALE:-10}
AUTH=${AUTH:-md5}
ONLY=${ONLY:-}
RAW=${RAW:-}
SCRAPE=${SCRAPE:-0}
BASELINE=${BASELINE:-}
PROFILE=${PROFILE:-}
CLK_TCK=$(getconf CLK_TCK)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_USER=bench
BENCH_PASSWORD=bench-pass

log() { printf '%s\n' "$*" >&2; }
die() { log "compare.sh: $*"; exit 1; }

case $AUTH in md5|trust) ;; *) die "AUTH must be md5 or trust" ;; esac

selected=()
for i in "${!WORKLOADS[@]}"; do
  IFS='|' read -r name _ _ <<<"${WORKLOADS[$i]}"
  [[ -z $ONLY || $name =~ $ONLY ]] && selected+=("$i")
done
[[ ${#selected[@]} -gt 0 ]] || die "ONLY=$ONLY matches no workload"
# The scale-out targets run only when a selected workload names them.
SCALE_OUT= MAIN_ROWS=
for i in "${selected[@]}"; do if [[ ${WORKLOADS[$i]} == *-x2* ]]; then SCALE_OUT=1; else MAIN_ROWS=1; fi; done

if [[ -z ${PG_BIN:-} ]]; then
  for v in 17 16 15 14 13; do
    if [[ -x /usr/lib/postgresql/$v/bin/initdb ]]; then PG_BIN=/usr/lib/postgresql/$v/bin; break; fi
  done
fi
[[ -n ${PG_BIN:-} ]] || die "PostgreSQL server binaries not found; set PG_BIN"

# PostgreSQL and PgBouncer refuse to run as root; setpriv (unlike runuser)
# execs in place, so $! is the daemon itself and signals reach it.
AS_PG=()
[[ $(id -u) == 0 ]] && AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
as_pg() { "${AS_PG[@]}" "$@"; }

install_pgbouncer() {
  command -v pgbouncer >/dev/null || [[ -x /usr/sbin/pgbouncer ]] && return
  [[ $(id -u) == 0 ]] || die "pgbouncer is not installed (apt-get install pgbouncer)"
  log "installing Debian's pgbouncer"
  # The package would start its own system-wide service; policy-rc.d vetoes
  # that for the length of the install.
  local policy=/usr/sbin/policy-rc.d made_policy=
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2 ||
    { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2; }
  [[ -n $made_policy ]] && rm -f "$policy"
  service pgbouncer stop >/dev/null 2>&1 || true
}

# Outside 32768-60999, the kernel's ephemeral range used by client sockets.
USED_PORTS=" "
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then USED_PORTS+="$p "; echo "$p"; return; fi
  done
}

wait_port() { # port pid name
  local i
  for ((i = 0; i < 200; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.05
  done
  log "$3 did not start listening on $1:"; cat "$WORK/$3".{out,log} >&2 2>/dev/null || true
  exit 1
}

if [[ -z ${PGCORRAL:-} ]]; then
  log "building pgcorral (cargo build --release)"
  (cd "$ROOT" && cargo build --release >&2)
  PGCORRAL=${CARGO_TARGET_DIR:-$ROOT/target}/release/pgcorral
fi
[[ -x $PGCORRAL ]] || die "PGCORRAL=$PGCORRAL is not an executable"
install_pgbouncer
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)

WORK=$(mktemp -d /tmp/pgcorral-compare.XXXXXX)
[[ $(id -u) == 0 ]] && chown postgres: "$WORK"
chmod 755 "$WORK"
cd "$WORK"

# Both the trap and the watchdog run this; it must be idempotent.
cat >"$WORK/cleanup.sh" <<EOF
for pid in \$(cat '$WORK/pids' 2>/dev/null); do kill -TERM "\$pid" 2>/dev/null; done
sleep 0.2
for pid in \$(cat '$WORK/pids' 2>/dev/null); do kill -KILL "\$pid" 2>/dev/null; done
[ -d '$WORK/pg' ] && ${AS_PG[*]} '$PG_BIN/pg_ctl' -D '$WORK/pg' -m immediate stop >/dev/null 2>&1
rm -rf '$WORK'
EOF
cleanup() { trap - EXIT INT TERM; sh "$WORK/cleanup.sh"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Covers a SIGKILLed script, which runs no trap.
setsid sh -c "while kill -0 $$ 2>/dev/null && [ -d '$WORK' ]; do sleep 1; done; [ -d '$WORK' ] && sh '$WORK/cleanup.sh'" \
  </dev/null >/dev/null 2>&1 &

# --- PostgreSQL -----------------------------------------------------------
PG_PORT=$(free_port)
log "PostgreSQL on port $PG_PORT (initdb, pgbench -i -s $SCALE)"
as_pg "$PG_BIN/initdb" -D "$WORK/pg" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$WORK/initdb.log" 2>&1 ||
  { cat "$WORK/initdb.log" >&2; exit 1; }
cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = 200
password_encryption = 'md5'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
EOF
cat >"$WORK/pg/pg_hba.conf" <<EOF
local all all trust
host all postgres 127.0.0.1/32 trust
host all $BENCH_USER 127.0.0.1/32 $AUTH
EOF
as_pg setsid "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/postgres.log" -w start >/dev/null ||
  { cat "$WORK/postgres.log" >&2; exit 1; }
su_sql() { psql -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "$1" >/dev/null; }
su_sql "CREATE ROLE $BENCH_USER LOGIN PASSWORD '$BENCH_PASSWORD'"
su_sql "CREATE DATABASE bench OWNER $BENCH_USER"
export PGPASSWORD=$BENCH_PASSWORD
pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$BENCH_USER" bench >"$WORK/pgbench-init.log" 2>&1 ||
  { cat "$WORK/pgbench-init.log" >&2; exit 1; }
psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U "$BENCH_USER" -d bench >/dev/null <<'SQL'
CREATE TABLE big_rows (id int PRIMARY KEY, data text);
ALTER TABLE big_rows ALTER data SET STORAGE EXTERNAL;
INSERT INTO big_rows SELECT g, repeat(md5(g::text), 10 * 1024 * 1024 / 32) FROM generate_series(1, 4) g;
SQL
printf '%s\n' '\set id random(1, 4)' 'SELECT data FROM big_rows WHERE id = :id;' >"$WORK/bigrows.sql"
chmod 644 "$WORK/bigrows.sql"

# --- poolers: one generated ini, differing only in port and file names -------
# A plain-text password serves both md5 to the client and either method to
# the server, so neither pooler needs anything the other lacks.
printf '"%s" "%s"\n' "$BENCH_USER" "$BENCH_PASSWORD" >"$WORK/userlist.txt"
# One self-signed certificate for both poolers' client TLS.
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$WORK/tls.key" -out "$WORK/tls.crt" -days 2 \
  -subj /CN=localhost >/dev/null 2>&1 || die "openssl could not make a certificate"
[[ $(id -u) == 0 ]] && chown postgres: "$WORK/tls.key" "$WORK/tls.crt"
export PGSSLMODE=disable
cat >"$WORK/pgbouncer.ini.in" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = @PORT@
unix_socket_dir = $WORK/@NAME@
auth_type = $AUTH
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 11000
max_db_connections = 0
logfile = $WORK/@NAME@.log
pidfile = $WORK/@NAME@.pid
log_connections = 0
log_disconnections = 0
admin_users = $BENCH_USER
client_tls_sslmode = prefer
client_tls_key_file = $WORK/tls.key
client_tls_cert_file = $WORK/tls.crt
EOF
[[ $(id -u) == 0 ]] && chown postgres: "$WORK/userlist.txt"
# max_client_conn needs file descriptors; the poolers inherit this limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

declare -A PORT PID  # PID: the target's daemon processes, space-separated
PORT[direct]=$PG_PORT
# name: the target; kind: pgbouncer or pgcorral (what the ini needs); processes: how many
# share the port with so_reuseport, splitting the pool of 20 between them.
start_pooler() { # name binary kind [processes]
  local name=$1 bin=$2 kind=$3 n=${4:-1} port k inst
  port=$(free_port)
  # A copy, so that user postgres can execute it wherever the build lives.
  cp "$bin" "$WORK/$name.bin"
  chmod 755 "$WORK/$name.bin"
  PID[$name]=
  for ((k = 1; k <= n; k++)); do
    inst=$name
    ((n > 1)) && inst=$name-$k
    mkdir -p "$WORK/$inst"
    sed -e "s|@PORT@|$port|" -e "s|@NAME@|$inst|g" -e "s|^default_pool_size = .*|default_pool_size = $((20 / n))|" \
      "$WORK/pgbouncer.ini.in" >"$WORK/$inst.ini"
    ((n > 1)) && echo "so_reuseport = 1" >>"$WORK/$inst.ini"
    if [[ $name == pgcorral ]]; then
      METRICS_PORT=$(free_port)
      printf 'metrics_addr = 127.0.0.1:%s\n' "$METRICS_PORT" >>"$WORK/$inst.ini"
    fi
    if [[ $kind == pgcorral ]] && ((n > 1)); then
      # One worker each, and every process a peer of the others, so cancels find their query.
      printf 'workers = 1\npeer_id = %s\n[peers]\n' "$k" >>"$WORK/$inst.ini"
      local j
      for ((j = 1; j <= n; j++)); do printf '%s = host=%s port=%s\n' "$j" "$WORK/$name-$j" "$port" >>"$WORK/$inst.ini"; done
    fi
    [[ $(id -u) == 0 ]] && chown -R postgres: "$WORK/$inst" "$WORK/$inst.ini"
    # Not through the as_pg function: a backgrounded function is a subshell,
    # and $! must be the daemon's own pid for the cleanup to reach it.
    "${AS_PG[@]}" "$WORK/$name.bin" "$WORK/$inst.ini" </dev/null >"$WORK/$inst.out" 2>&1 &
    echo $! >>"$WORK/pids"
    PID[$name]+="$! "
    wait_port "$port" $! "$inst"
  done
  PORT[$name]=$port
  log "$name on port $port ($n process$( ((n > 1)) && echo es))"
}
start_pooler pgbouncer "$PGBOUNCER" pgbouncer
start_pooler pgcorral "$PGCORRAL" pgcorral
ALL_TARGETS="direct pgbouncer pgcorral"
if [[ -n $BASELINE ]]; then
  [[ -x $BASELINE ]] || die "BASELINE=$BASELINE is not an executable"
  start_pooler baseline "$BASELINE" pgcorral
  ALL_TARGETS+=" baseline"
fi
if [[ -n $SCALE_OUT ]]; then
  start_pooler pgbouncer-x2 "$PGBOUNCER" pgbouncer 2
  start_pooler pgcorral-x2 "$PGCORRAL" pgcorral 2
  ALL_TARGETS+=" pgbouncer-x2 pgcorral-x2"
fi

for t in $ALL_TARGETS; do
  psql -X -At -h 127.0.0.1 -p "${PORT[$t]}" -U "$BENCH_USER" -d bench -c 'SELECT 1' >/dev/null 2>"$WORK/check.err" ||
    { log "$t does not answer SELECT 1:"; cat "$WORK/check.err" >&2; exit 1; }
done

# --- runs ----------------------------------------------------------------
# One scrape a second of what a monitoring system would read from the target.
scrape_loop() { # target
  while :; do
    case $1 in
      pgcorral)
        { exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT" && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3 >/dev/null; } 2>/dev/null ;;
      pgbouncer)
        psql -X -q -h 127.0.0.1 -p "${PORT[pgbouncer]}" -U "$BENCH_USER" -d pgbouncer -c 'SHOW POOLS' -c 'SHOW STATS' >/dev/null 2>&1 ;;
    esac
    sleep 1
  done
}

# A process's user and system CPU so far, in clock ticks (after the last ')': the command
# name may hold spaces), summed over the target's processes.
cpu_ticks() { # pids...
  local pid
  for pid in "$@"; do sed 's/.*) //' "/proc/$pid/stat"; done | awk '{u += $12; s += $13} END {print u, s}'
}

declare -A TPS LAT P99 CPU_USER CPU_SYS  # "workload|target" -> space-separated values, one per run
run_pgbench() { # workload-index target
  local name args conninfo out tps lat rc=0 before= perf= row
  IFS='|' read -r name args _ conninfo <<<"${WORKLOADS[$1]}"
  args=${args//@BIGROWS@/$WORK/bigrows.sql}
  out="$WORK/run.out"
  # shellcheck disable=SC2086  # args is a word list by design
  rm -f "$WORK"/txlog.*
  local scraper=
  if [[ $SCRAPE == 1 && $2 != direct ]]; then scrape_loop "$2" & scraper=$!; fi
  row=$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '_')
  if [[ $2 != direct ]]; then
    # shellcheck disable=SC2086  # one word per process
    before=$(cpu_ticks ${PID[$2]})
    if [[ -n $PROFILE ]]; then
      mkdir -p "$PROFILE"
      local pids=${PID[$2]% }
      perf record -q -g -F 499 -p "${pids// /,}" -o "$PROFILE/$row.$2.data" -- sleep "$DURATION" >/dev/null 2>&1 &
      perf=$!
    fi
  fi
  pgbench -n -T "$DURATION" -h 127.0.0.1 -p "${PORT[$2]}" -U "$BENCH_USER" -l --log-prefix="$WORK/txlog" \
    $args "dbname=bench $conninfo" >"$out" 2>&1 || rc=$?
  [[ -n $scraper ]] && { kill "$scraper" 2>/dev/null; wait "$scraper" 2>/dev/null || true; }
  if [[ -n $before ]]; then
    local after xacts
    # shellcheck disable=SC2086
    after=$(cpu_ticks ${PID[$2]})
    xacts=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -1)
    # A failed run (PgBouncer 1.18 on the prepared row) has no meaningful cost per transaction.
    if [[ $rc == 0 && -n $xacts && $xacts -gt 0 ]]; then
      read -r u0 s0 <<<"$before"; read -r u1 s1 <<<"$after"
      CPU_USER["$1|$2"]+="$(awk -v t=$((u1 - u0)) -v n="$xacts" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", t * 1e6 / hz / n}') "
      CPU_SYS["$1|$2"]+="$(awk -v t=$((s1 - s0)) -v n="$xacts" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", t * 1e6 / hz / n}') "
    fi
  fi
  if [[ -n $perf ]]; then
    wait "$perf" 2>/dev/null || true
    perf report -i "$PROFILE/$row.$2.data" --stdio --no-children --percent-limit 1 -g none \
      2>/dev/null | grep -v '^#' | grep -v '^$' | head -40 >"$PROFILE/$row.$2.txt" || true
  fi
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | head -1)
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$out" | head -1)
  # p99 from the per-transaction log (third field: latency in microseconds).
  p99=$(cat "$WORK"/txlog.* 2>/dev/null | awk '{print $3}' | sort -n |
    awk '{v[NR]=$1} END {if (NR) {i=int(NR*0.99); if (i<1) i=1; printf "%.3f", v[i]/1000}}')
  rm -f "$WORK"/txlog.*
  if [[ $rc != 0 || -z $tps ]]; then
    log "  $name on $2 failed (exit $rc):"; tail -5 "$out" >&2
    tps=ERR lat=ERR p99=ERR
  fi
  TPS["$1|$2"]+="$tps "
  LAT["$1|$2"]+="$lat "
  P99["$1|$2"]+="${p99:-ERR} "
  log "  $(printf '%-40s %-10s tps %10s  latency %8s ms  p99 %8s ms' "$name" "$2" "$tps" "$lat" "$p99")"
  [[ -n $RAW ]] && printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$name" "$2" "$tps" "$lat" >>"$RAW"
  return 0
}

for ((round = 0; round < RUNS; round++)); do
  log "round $((round + 1))/$RUNS"
  # History grows with every tpcb-like run; keep rounds comparable.
  psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench -c 'TRUNCATE pgbench_history' -c 'VACUUM ANALYZE' >/dev/null
  for i in "${selected[@]}"; do
    IFS='|' read -r _ _ targets _ <<<"${WORKLOADS[$i]}"
    [[ -n $BASELINE ]] && targets=${targets/pgcorral/pgcorral baseline}
    read -ra order <<<"$targets"
    # Rotate who goes first each round so warm-up and drift hit every target.
    n=${#order[@]}
    for ((k = 0; k < n; k++)); do run_pgbench "$i" "${order[(k + round) % n]}"; done
  done
done

# --- report --------------------------------------------------------------
median() { # values... ; ERR if any run failed
  [[ " $* " == *" ERR "* ]] && { echo ERR; return; }
  printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2f", a/b; else print "-" }'; }
fmt() { awk -v v="$1" -v d="$2" 'BEGIN { if (v ~ /^[0-9.]+$/) printf "%." d "f", v; else print v }'; }

echo
echo "pgbench, median of $RUNS runs of ${DURATION}s, scale $SCALE, auth $AUTH, pool_mode transaction, default_pool_size 20$([[ $SCRAPE == 1 ]] && echo ', poolers scraped every second');"
echo "$(nproc) cores; PgBouncer $("$PGBOUNCER" --version | head -1 | awk '{print $2}'); pgcorral $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') ($PGCORRAL); $(date -u +%F)"
echo
[[ -n $BASELINE ]] && echo "baseline: $BASELINE"
if [[ -n $MAIN_ROWS ]]; then
extra_head= extra_rule=
if [[ -n $BASELINE ]]; then extra_head=" baseline tps | pgcorral/baseline | baseline p99 ms |"; extra_rule="---:|---:|---:|"; fi
echo "| workload | direct tps | PgBouncer tps | pgcorral tps | pgcorral/PgBouncer | pgcorral/direct | direct ms | PgBouncer ms | pgcorral ms | PgBouncer p99 ms | pgcorral p99 ms | p99 pgcorral/PgBouncer |$extra_head"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|$extra_rule"
for i in "${selected[@]}"; do
  [[ ${WORKLOADS[$i]} == *-x2* ]] && continue
  IFS='|' read -r name args _ <<<"${WORKLOADS[$i]}"
  declare -A mt=() ml=() mp=()
  for t in $ALL_TARGETS; do
    # shellcheck disable=SC2086
    mt[$t]=$(median ${TPS["$i|$t"]:-})
    # shellcheck disable=SC2086
    ml[$t]=$(median ${LAT["$i|$t"]:-})
    # shellcheck disable=SC2086
    mp[$t]=$(median ${P99["$i|$t"]:-})
  done
  extra=
  if [[ -n $BASELINE ]]; then
    extra=" $(fmt "${mt[baseline]}" 0) | $(ratio "${mt[pgcorral]}" "${mt[baseline]}") | $(fmt "${mp[baseline]}" 2) |"
  fi
  printf '| %s (`%s`) | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |%s\n' "$name" "${args//@BIGROWS@/bigrows.sql}" \
    "$(fmt "${mt[direct]}" 0)" "$(fmt "${mt[pgbouncer]}" 0)" "$(fmt "${mt[pgcorral]}" 0)" \
    "$(ratio "${mt[pgcorral]}" "${mt[pgbouncer]}")" "$(ratio "${mt[pgcorral]}" "${mt[direct]}")" \
    "$(fmt "${ml[direct]}" 2)" "$(fmt "${ml[pgbouncer]}" 2)" "$(fmt "${ml[pgcorral]}" 2)" \
    "$(fmt "${mp[pgbouncer]}" 2)" "$(fmt "${mp[pgcorral]}" 2)" "$(ratio "${mp[pgcorral]}" "${mp[pgbouncer]}")" "$extra"
done

echo
echo "CPU per transaction of each pooler process (µs of user + system time, all threads, median of $RUNS runs):"
echo
cpu_head= cpu_rule=
if [[ -n $BASELINE ]]; then cpu_head=" baseline user + sys | pgcorral/baseline |"; cpu_rule="---:|---:|"; fi
echo "| workload | PgBouncer user + sys | pgcorral user + sys | pgcorral/PgBouncer |$cpu_head"
echo "|---|---:|---:|---:|$cpu_rule"
cpu_total() { # workload-index target: median µs of user + system time per transaction
  local u s
  # shellcheck disable=SC2086
  u=$(median ${CPU_USER["$1|$2"]:-})
  # shellcheck disable=SC2086
  s=$(median ${CPU_SYS["$1|$2"]:-})
  awk -v u="$u" -v s="$s" 'BEGIN { if (u ~ /^[0-9.]+$/ && s ~ /^[0-9.]+$/) printf "%.1f", u + s; else print "-" }'
}
for i in "${selected[@]}"; do
  [[ ${WORKLOADS[$i]} == *-x2* ]] && continue
  IFS='|' read -r name _ _ <<<"${WORKLOADS[$i]}"
  declare -A cu=() cs=() ct=()
  for t in $ALL_TARGETS; do
    [[ $t == direct ]] && continue
    # shellcheck disable=SC2086
    cu[$t]=$(median ${CPU_USER["$i|$t"]:-})
    # shellcheck disable=SC2086
    cs[$t]=$(median ${CPU_SYS["$i|$t"]:-})
    ct[$t]=$(awk -v u="${cu[$t]}" -v s="${cs[$t]}" 'BEGIN { if (u ~ /^[0-9.]+$/ && s ~ /^[0-9.]+$/) printf "%.1f", u + s; else print "-" }')
  done
  cell() { [[ ${ct[$1]:-"-"} == "-" ]] && { echo "-"; return; }; echo "$(fmt "${cu[$1]}" 1) + $(fmt "${cs[$1]}" 1) = ${ct[$1]}"; }
  extra=
  [[ -n $BASELINE ]] && extra=" $(cell baseline) | $(ratio "${ct[pgcorral]}" "${ct[baseline]}") |"
  printf '| %s | %s | %s | %s |%s\n' "$name" "$(cell pgbouncer)" "$(cell pgcorral)" \
    "$(ratio "${ct[pgcorral]}" "${ct[pgbouncer]}")" "$extra"
done

fi  # MAIN_ROWS
[[ -z $SCALE_OUT ]] && exit 0
echo
echo "Scale-out: two processes sharing the port with so_reuseport (pool 10 each) against one process"
echo "(pool 20); pgcorral's two run workers = 1 and peer each other, its one runs a worker per core."
echo "Median tps of $RUNS runs, and CPU per transaction summed over a target's processes (µs):"
echo
echo "| workload | PgBouncer | PgBouncer ×2 | ×2/×1 | pgcorral | pgcorral ×2 | ×2/×1 | pgcorral ×2/PgBouncer ×2 | CPU PgBouncer ×2 | CPU pgcorral ×2 |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for i in "${selected[@]}"; do
  [[ ${WORKLOADS[$i]} == *-x2* ]] || continue
  IFS='|' read -r name args _ <<<"${WORKLOADS[$i]}"
  declare -A mt=()
  # shellcheck disable=SC2086
  for t in pgbouncer pgbouncer-x2 pgcorral pgcorral-x2; do mt[$t]=$(median ${TPS["$i|$t"]:-}); done
  printf '| %s (`%s`) | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$args" \
    "$(fmt "${mt[pgbouncer]}" 0)" "$(fmt "${mt[pgbouncer-x2]}" 0)" "$(ratio "${mt[pgbouncer-x2]}" "${mt[pgbouncer]}")" \
    "$(fmt "${mt[pgcorral]}" 0)" "$(fmt "${mt[pgcorral-x2]}" 0)" "$(ratio "${mt[pgcorral-x2]}" "${mt[pgcorral]}")" \
    "$(ratio "${mt[pgcorral-x2]}" "${mt[pgbouncer-x2]}")" "$(cpu_total "$i" pgbouncer-x2)" "$(cpu_total "$i" pgcorral-x2)"
done
