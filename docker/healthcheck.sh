#!/bin/bash
# The images' HEALTHCHECK, installed as /usr/local/bin/bay-healthcheck:
#
#   bay-healthcheck /healthz          # exit 0 iff GET http://$BAY_LISTEN/healthz answers 200
#
# Plain bash (its /dev/tcp), so the image needs no curl or wget. It reads the address from
# BAY_LISTEN, so configure the listen address with the environment variable, not --listen.
# An unspecified address (0.0.0.0, [::]) is checked on loopback.
set -euo pipefail

path=${1:?usage: bay-healthcheck PATH}
listen=${BAY_LISTEN:?BAY_LISTEN is not set}
host=${listen%:*}
port=${listen##*:}
host=${host#[}
host=${host%]}
case $host in
    0.0.0.0) host=127.0.0.1 ;;
    ::) host=::1 ;;
esac

exec 3<>"/dev/tcp/$host/$port"
printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$listen" >&3
read -r -t 5 _version status _reason <&3
if [ "$status" != 200 ]; then
    echo "GET http://$listen$path answered ${status:-nothing}" >&2
    exit 1
fi
