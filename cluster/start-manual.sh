#!/usr/bin/env bash
# Manual cluster start without `ray up`: run the first command on the head, the second on every
# worker. Credentials come from /etc/sinq/credentials.env (mode 600), loaded into Ray's environment;
# the cluster's token from /etc/sinq/ray_auth_token (mode 600, the same file on every node and on
# the machines that submit jobs), so the dashboard on 0.0.0.0 refuses anyone without it.
#   head:    bash cluster/start-manual.sh head
#   worker:  bash cluster/start-manual.sh worker HEAD_IP
set -euo pipefail
role="${1:?head or worker}"
set -a; [ -f /etc/sinq/credentials.env ] && . /etc/sinq/credentials.env; set +a
export SINQ_AUTO_PATCH=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/etc/sinq/ray_auth_token
[ -s "$RAY_AUTH_TOKEN_PATH" ] || { echo "error: $RAY_AUTH_TOKEN_PATH is missing (see cluster/README.md, Authentication)" >&2; exit 1; }
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
case "$role" in
  head) ray start --head --port=6379 --dashboard-host=0.0.0.0 --num-gpus="$gpus" ;;
  worker) ray start --address="${2:?head address}:6379" --num-gpus="$gpus" ;;
  *) echo "usage: $0 head | worker HEAD_IP" >&2; exit 2 ;;
esac
