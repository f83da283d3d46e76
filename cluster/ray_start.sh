#!/bin/bash
# Start a Ray cluster by hand for `ingest run --engine ray --ray-address HEAD_IP:PORT` (Ray >= 2.60).
#
#   head$    cluster/ray_start.sh head [PORT]          # prints the command for the other nodes
#   node$    cluster/ray_start.sh worker HEAD_IP:PORT   # on every other node
#   any$     cluster/ray_start.sh stop                 # `ray stop`: EVERY Ray process of yours on this machine
#
# `stop` ends not only this cluster's node but any other Ray you run on the machine (a private Ray of an
# `ingest run --engine ray` without --ray-address, a notebook's ray.init(); as root: everyone's).
#
# Usage statistics are off and no dashboard is started. The cluster uses Ray's token authentication (on by default
# for local clusters since Ray 2.59, for all clusters from 2.61): `ray get-auth-token --generate` writes a token to
# ~/.ray/auth_token on the head. Every other node and the driver need the same token: a home directory shared by all
# nodes gives it to them; otherwise copy the file to the same path, point RAY_AUTH_TOKEN_PATH at a copy, or export
# RAY_AUTH_TOKEN. Then, on the head:
#
#   RAY_AUTH_MODE=token ingest run --engine ray --ray-address HEAD_IP:PORT --videos LIST --out /shared/OUT ...
set -euo pipefail

export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token

usage() {
    echo "usage: $0 head [PORT] | worker HEAD_IP:PORT | stop" >&2
    exit 2
}

case "${1:-}" in
head)
    port=${2:-6379}
    ray get-auth-token --generate >/dev/null
    ray start --head --port="$port" --disable-usage-stats --include-dashboard=false
    echo "on each other node (with the token at ~/.ray/auth_token): $0 worker $(hostname -I | awk '{print $1}'):$port"
    ;;
worker)
    address=${2:-}
    [[ -n $address ]] || usage
    if [[ -z ${RAY_AUTH_TOKEN:-} && ! -f ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
        echo "no Ray token on this node: copy ~/.ray/auth_token from the head (or set RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)" >&2
        exit 1
    fi
    ray start --address="$address" --disable-usage-stats
    ;;
stop)
    ray stop
    ;;
*)
    usage
    ;;
esac
