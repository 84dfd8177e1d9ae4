# Helpers shared by the bench scripts (sourced; each script defines log()).

die() {
  log "error: $*"
  exit 1
}

# A scratch directory in work_dir (squall-$1.XXXXXX under $TMPDIR), removed when the script exits,
# after the server whose pid the script keeps in server_pid, if any, is stopped.
make_work_dir() {
  work_dir=$(mktemp -d "${TMPDIR:-/tmp}/squall-$1.XXXXXX")
  server_pid=""
  trap stop_server_and_remove_work_dir EXIT
}

stop_server_and_remove_work_dir() {
  if [[ -n $server_pid ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work_dir"
}

# The pid given and all its descendants (nginx with a master, a forking squalld, ...).
process_tree() {
  local pids=("$1") index=0 pid children_file child
  while ((index < ${#pids[@]})); do
    pid=${pids[index]}
    index=$((index + 1))
    for children_file in /proc/"$pid"/task/*/children; do
      [[ -r $children_file ]] || continue
      for child in $(<"$children_file"); do
        pids+=("$child")
      done
    done
  done
  printf '%s\n' "${pids[@]}"
}

# utime+stime in clock ticks, summed over a server's processes (all their threads included);
# with a second argument "user", utime alone (the time in the server's own code, not the kernel's).
cpu_ticks() {
  local total=0 pid stat fields
  for pid in $(process_tree "$1"); do
    stat=$(<"/proc/$pid/stat") || continue
    # Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
    read -ra fields <<<"${stat##*) }"
    if [[ ${2:-} == user ]]; then
      total=$((total + fields[11]))
    else
      total=$((total + fields[11] + fields[12]))
    fi
  done
  printf '%s\n' "$total"
}

# Prints the user+nice+system ticks so far of CPU $1, from /proc/stat.
cpu_busy_ticks() {
  local fields
  while read -ra fields; do
    if [[ ${fields[0]} == "cpu$1" ]]; then
      printf '%s\n' "$((fields[1] + fields[2] + fields[3]))"
      return 0
    fi
  done </proc/stat
  die "no cpu$1 line in /proc/stat"
}

# Reads a port written by a server into a file: a bare port or host:port on the first line.
# Only a complete line counts, so a half-written file is never taken for a port.
port_from_file() {
  local file=$1 line
  [[ -s $file ]] || return 1
  IFS= read -r line <"$file" || return 1
  line=${line%$'\r'}
  line=${line##*:}
  [[ $line =~ ^[0-9]+$ ]] || return 1
  printf '%s\n' "$line"
}

# Runs a client (wrk, the idle-connection helper) in the background and waits for it, so that
# an interrupt reaches this script's traps at once: bash holds a trap until a foreground command
# ends, and forgets SIGINT altogether when that command catches it and exits normally, as wrk
# does. $1 and $2 are files for its stdout and stderr (the same file for both is fine); its user
# and system CPU seconds go to the file $3.
run_client() {
  local stdout_file=$1 stderr_file=$2 time_file=$3 status=0 TIMEFORMAT='%3U %3S'
  shift 3
  if [[ $stderr_file == "$stdout_file" ]]; then
    "$@" >"$stdout_file" 2>&1 &
  else
    "$@" >"$stdout_file" 2>"$stderr_file" &
  fi
  client_pid=$!
  { time wait "$client_pid"; } 2>"$time_file" || status=$?
  client_pid=""
  return "$status"
}

# The machine's load, for a report: "load average 1/5/15 min; N processes running; the busiest
# other processes" (by CPU over the last second, this script's own children excluded by pid $1
# and its descendants, if given). The machine is shared: a figure without this is unreadable.
machine_load() {
  local exclude=${1:-} one five fifteen running busiest
  read -r one five fifteen running _ </proc/loadavg
  local excluded=" "
  [[ -z $exclude ]] || excluded+="$(process_tree "$exclude" | tr '\n' ' ')"
  busiest=$(top -b -n 2 -d 1 -w 200 2>/dev/null | awk -v skip="$excluded" '
    /^top -/ { frame++; next }
    frame == 2 && $1 ~ /^[0-9]+$/ && $9 + 0 >= 5 && index(skip, " " $1 " ") == 0 {
      printf "%s%s %s%%", sep, $12, $9; sep = ", "; if (++n == 4) exit }')
  printf 'load average %s %s %s; %s runnable; others using CPU: %s\n' "$one" "$five" "$fifteen" \
    "${running%/*}" "${busiest:-none above 5%}"
}

# Counts the instructions a server under callgrind spends on one wrk run: zeroes the counters of
# the valgrind process $1 (callgrind_control -z), runs "$WRK" with the rest of the arguments
# (its report to the file $3), dumps the counters (-d) and waits for the dump, which callgrind
# writes as <$2>.<pid>.<n> when started with --callgrind-out-file=<$2>.%p. Sets
# callgrind_instructions (Ir: user space only), callgrind_requests (the responses wrk received)
# and callgrind_dump (the dump's file, for callgrind_annotate; the caller removes it).
callgrind_wrk() {
  local pid=$1 prefix=$2 output=$3 tries
  shift 3
  callgrind_control -z "$pid" >/dev/null
  "$WRK" "$@" >"$output" 2>&1 || die "wrk failed: $WRK $*"
  rm -f "$prefix".*.[0-9]*
  callgrind_control -d "$pid" >/dev/null
  callgrind_dump=""
  for ((tries = 0; tries < 100; tries++)); do
    callgrind_dump=$(ls "$prefix".*.[0-9]* 2>/dev/null | head -n 1) && [[ -n $callgrind_dump ]] &&
      break
    sleep 0.1
  done
  [[ -n $callgrind_dump ]] || die "no callgrind dump $prefix.* from process $pid"
  sleep 0.5  # The dump is written whole.
  callgrind_instructions=$(awk '/^(summary|totals):/ { print $2; exit }' "$callgrind_dump")
  callgrind_requests=$(awk '/requests in/ { print $1; exit }' "$output")
  [[ -n $callgrind_instructions && -n $callgrind_requests && $callgrind_requests -gt 0 ]] ||
    die "could not read the instructions ($callgrind_dump) or the requests ($output)"
}

# For email_bench_config: "key = value" when the value $2 is given ($3 = string: quoted),
# nothing for an empty one.
toml_key() {
  [[ -n $2 ]] || return 0
  if [[ ${3:-} == string ]]; then printf '%s = "%s"\n' "$1" "$2"; else printf '%s = %s\n' "$1" "$2"; fi
}

# For email_bench_config: a blank line, the comment $3 if given, "[$1]" and its keys $2; nothing
# when it has no keys.
toml_table() {
  [[ -n $2 ]] || return 0
  printf '\n%s%s[%s]\n%s\n' "${3:-}" "${3:+$'\n'}" "$1" "$2"
}

# Writes the squalld configuration of the POST /email benchmarks (run_email.sh, run_email_pg.sh,
# email_strace.sh, email_callgrind.sh, send_callgrind.sh) to the file $1. The other arguments
# are NAME=VALUE options; an option set to "" leaves its key out (squalld's default applies).
# The defaults are those of the wrk runs: many connections kept open between runs, a queue
# that never pushes back (503) and one client from one address that no quota slows down.
#   relay=HOST:PORT        [smtp] url = "smtp://HOST:PORT" (required)
#   store=PATH_OR_URL      [jobs] store: a SQLite file or a postgresql:// URL (required)
#   durability=full        [jobs] durability
#   sends=2                [jobs] max_concurrent_sends
#   thread_pool_size=auto  [server] thread_pool_size; auto: sends + 2 (a thread per send, two
#                          spare)
#   smtp_connections=""    [smtp] connections ("" for a squalld from before the key existed)
#   smtp_connect_timeout="" smtp_timeout=""  [smtp] connect_timeout and timeout (e.g. "10m" for
#                          a relay that is made to stall)
#   lease=""               [jobs] lease
#   max_connections=20000  [server] max_connections
#   keepalive=300s         [timeouts] keepalive
#   max_queued=100000000 max_queued_bytes=64GiB   [jobs] max_queued and max_queued_bytes
email_bench_config() {
  local file=$1 option name
  shift
  local -A o=([relay]="" [store]="" [durability]=full [sends]=2 [thread_pool_size]=auto
    [smtp_connections]="" [smtp_connect_timeout]="" [smtp_timeout]="" [lease]=""
    [max_connections]=20000 [keepalive]=300s [max_queued]=100000000 [max_queued_bytes]=64GiB)
  for option; do
    name=${option%%=*}
    [[ $option == *=* && -v "o[$name]" ]] || die "email_bench_config: unknown option '$option'"
    o[$name]=${option#*=}
  done
  [[ -n ${o[relay]} && -n ${o[store]} ]] || die "email_bench_config: relay= and store= are required"
  [[ ${o[thread_pool_size]} != auto ]] || o[thread_pool_size]=$((o[sends] + 2))
  {
    printf '# Written by bench/%s.\n' "${0##*/}"
    toml_table server "$(toml_key max_connections "${o[max_connections]}"
      toml_key thread_pool_size "${o[thread_pool_size]}")"
    toml_table timeouts "$(toml_key keepalive "${o[keepalive]}" string)"
    toml_table log "$(toml_key level warn string; toml_key access_log off string)"
    toml_table smtp "$(toml_key url "smtp://${o[relay]}" string
      toml_key starttls off string
      toml_key from "Squall Bench <bench@example.com>" string
      toml_key connect_timeout "${o[smtp_connect_timeout]}" string
      toml_key timeout "${o[smtp_timeout]}" string
      toml_key connections "${o[smtp_connections]}")"
    toml_table jobs "$(toml_key store "${o[store]}" string
      toml_key durability "${o[durability]}" string
      toml_key max_concurrent_sends "${o[sends]}"
      toml_key max_queued "${o[max_queued]}"
      toml_key max_queued_bytes "${o[max_queued_bytes]}" string
      toml_key lease "${o[lease]}" string)"
    toml_table quota "$(toml_key address_per_minute 6000000
      toml_key address_burst 1000000
      toml_key max_queued_per_client 100000000)" \
      "# One client from one address is the whole point here: no rate limit or queue share applies."
  } >"$file"
}
