#!/usr/bin/env bash
# Swarm benchmark driver: checks root and tools, builds the release binaries, runs
# bench/swarm.py under a hard time limit, and whatever happens removes this run's network
# namespaces (ending the processes left in them, by PID) and its scratch directory.
#
#   sudo bench/swarm.sh                      # N=8, S=256M, B=100mbit, direct + cold + warm
#   sudo bench/swarm.sh -n 16 -s 128M        # see --help for every flag
#   sudo bench/swarm.sh --no-build -n 4 -s 64M --modes cold,warm
#
# Environment: BAY_BENCH_NO_INSTALL=1 to fail instead of apt-get installing missing tools.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

build=1
args=()
for a in "$@"; do
  case $a in
    --no-build) build=0 ;;
    -h | --help)
      python3 "$here/swarm.py" --help
      echo
      echo "swarm.sh only: --no-build   use the existing target/release binaries"
      exit 0
      ;;
    *) args+=("$a") ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "bench/swarm.sh: needs root (ip netns, veth, tc); try: sudo $0 $*" >&2
  exit 1
fi

# command:Debian package
need=(ip:iproute2 tc:iproute2 curl:curl openssl:openssl python3:python3 skopeo:skopeo
  docker-registry:docker-registry gnuplot:gnuplot-nox timeout:coreutils)
missing=()
for pair in "${need[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ -n "${BAY_BENCH_NO_INSTALL:-}" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "bench/swarm.sh: missing Debian packages: ${missing[*]}" >&2
    exit 1
  fi
  echo "bench/swarm.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi

if [ "$build" = 1 ]; then
  echo "bench/swarm.sh: cargo build --release --bins" >&2
  (cd "$repo" && cargo build --release --bins --quiet)
fi

# Validates the flags and gives the run's own time limit; ours is a backstop above it.
limit=$(python3 "$here/swarm.py" --print-timeout "${args[@]}")
run_id="bsw$$"
work=$(mktemp -d /tmp/bay-swarm.XXXXXX)
# --tcp-cc and --tcp-cc-route may add to the host's allowed congestion controls; swarm.py puts
# the list back, and this does if swarm.py was killed first.
allowed_cc_file=/proc/sys/net/ipv4/tcp_allowed_congestion_control
allowed_cc=$(cat "$allowed_cc_file")

tidy() {
  local ns pid
  if [ "$(cat "$allowed_cc_file")" != "$allowed_cc" ]; then
    echo "$allowed_cc" >"$allowed_cc_file" || true
  fi
  for ns in $(ip netns list | awk '{print $1}' | grep "^${run_id}-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      kill -KILL "$pid" 2>/dev/null || true
    done
    ip netns del "$ns" 2>/dev/null || true
  done
  case " ${args[*]} " in
    *" --keep-work "*) echo "bench/swarm.sh: scratch kept in $work" >&2 ;;
    *) rm -rf "$work" ;;
  esac
}
trap tidy EXIT
trap 'exit 130' INT TERM HUP

# --foreground: python3 stays in our process group, so Ctrl-C reaches it and it tidies up
# itself; on the time limit it gets SIGTERM, and SIGKILL 30 s later if still running.
timeout --foreground --kill-after=30 $((limit + 120)) \
  python3 "$here/swarm.py" --run-id "$run_id" --work-dir "$work" "${args[@]}"
