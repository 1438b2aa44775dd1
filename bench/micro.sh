#!/usr/bin/env bash
# Micro-benchmarks of issue 7, everything on loopback (127.0.0.50-55): announce rate against
# opentracker, cache-hit blob serving against docker-registry, manifest pass-through latency,
# and bay-proxy's peak RSS while streaming a big blob. Each is a ratio from one run; the set
# runs three times (--runs) and the median is reported.
#
#   sudo bench/micro.sh                                   # everything, defaults (see --help)
#   sudo bench/micro.sh --bin-dir /tmp/bay-micro-bin      # binaries copied away from target/
#   sudo bench/micro.sh --tests announce --runs 1 --wrk-duration 5
#
# Installs nothing: it names the Debian packages that are missing and stops. Runs under a hard
# time limit; on exit, failure, Ctrl-C or SIGTERM every process it started is ended by PID and
# its scratch directory (/tmp/bay-micro.*) removed. Results: bench/results/micro-<date>/results.json.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

for a in "$@"; do
  case $a in
    -h | --help)
      python3 "$here/micro.py" --help
      exit 0
      ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "bench/micro.sh: needs root (opentracker drops privileges, /proc/<pid>/clear_refs); try: sudo $0 $*" >&2
  exit 1
fi

# command:Debian package
need=(python3:python3 curl:curl wrk:wrk opentracker:opentracker docker-registry:docker-registry
  taskset:util-linux timeout:coreutils)
missing=()
for pair in "${need[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench/micro.sh: missing tools; install the Debian packages: apt-get install ${missing[*]}" >&2
  exit 1
fi

# Validates the flags and gives the run's own time limit; ours is a backstop above it.
limit=$(python3 "$here/micro.py" --print-timeout "$@")
work=$(mktemp -d /tmp/bay-micro.XXXXXX)

tidy() {
  local pid start name
  # micro.py stops its processes itself; this is for when it was killed before it could.
  # Only a PID whose start time still matches the one recorded is ours.
  if [ -f "$work/pids" ]; then
    while read -r pid start name; do
      if [ -r "/proc/$pid/stat" ] &&
        [ "$(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $20}')" = "$start" ]; then
        kill -KILL "$pid" 2>/dev/null && echo "bench/micro.sh: killed leftover $name (pid $pid)" >&2
      fi
    done <"$work/pids"
  fi
  case " $* " in
    *" --keep-work "*) echo "bench/micro.sh: scratch kept in $work" >&2 ;;
    *) rm -rf "$work" ;;
  esac
}
trap 'tidy "$@"' EXIT
trap 'exit 130' INT TERM HUP

cd "$repo"
# --foreground: python3 stays in our process group, so Ctrl-C reaches it and it tidies up
# itself; on the time limit it gets SIGTERM, and SIGKILL 30 s later if still running.
timeout --foreground --kill-after=30 $((limit + 60)) \
  python3 "$here/micro.py" --work-dir "$work" "$@"
