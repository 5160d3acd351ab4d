#!/usr/bin/env bash
# Manual cluster start without `ray up`: run the first command on the head, the second on every
# worker. Credentials come from /etc/sinq/credentials.env (mode 600), loaded into Ray's environment.
#   head:    bash cluster/start-manual.sh head
#   worker:  bash cluster/start-manual.sh worker HEAD_IP
set -euo pipefail
role="${1:?head or worker}"
set -a; [ -f /etc/sinq/credentials.env ] && . /etc/sinq/credentials.env; set +a
export SINQ_AUTO_PATCH=0
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
case "$role" in
  head) ray start --head --port=6379 --dashboard-host=0.0.0.0 --num-gpus="$gpus" ;;
  worker) ray start --address="${2:?head address}:6379" --num-gpus="$gpus" ;;
  *) echo "usage: $0 head | worker HEAD_IP" >&2; exit 2 ;;
esac
