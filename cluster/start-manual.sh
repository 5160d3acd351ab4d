#!/usr/bin/env bash
# Manual cluster start without `ray up`: run the first command once, the second on the head, the
# third on every worker. Credentials come from /etc/sinq/credentials.env (mode 600), loaded into
# Ray's environment; the cluster's token from /etc/sinq/ray_auth_token (mode 600, owned by the
# account that runs Ray, the same file on every node and on the machines that submit jobs), so the
# dashboard on 0.0.0.0 refuses anyone without it (cluster/README.md, Authentication).
#   token:   bash cluster/start-manual.sh token       # once: writes a new token file; copy it to each node
#   head:    bash cluster/start-manual.sh head
#   worker:  bash cluster/start-manual.sh worker HEAD_IP
set -euo pipefail
role="${1:?token, head or worker}"
token_file="${RAY_AUTH_TOKEN_PATH:-/etc/sinq/ray_auth_token}"

if [ "$role" = token ]; then
  if [ -e "$token_file" ]; then
    echo "$token_file already exists; left as it is" >&2
  else
    # umask 077: the file is mode 600 from the moment it exists; the token is never printed.
    (umask 077 && mkdir -p "$(dirname "$token_file")" &&
      python3 -c 'import secrets; print(secrets.token_hex(32))' > "$token_file")
    echo "wrote $token_file (mode 600): copy it, keeping its mode, to every node and submitting machine" >&2
  fi
  exit 0
fi

set -a; [ -f /etc/sinq/credentials.env ] && . /etc/sinq/credentials.env; set +a
export SINQ_AUTO_PATCH=0
# Ray reads the token from this file (RAY_AUTH_TOKEN_PATH) on every node; RAY_AUTH_MODE=token makes
# `ray start` refuse to run without it, rather than start a cluster anyone who reaches it can use.
[ -s "$token_file" ] && [ -r "$token_file" ] || {
  echo "no readable Ray token at $token_file: run '$0 token' once, then copy the file to every node" >&2; exit 1; }
case "$(stat -c %a "$token_file")" in
  *00) ;;
  *) echo "$token_file is readable by other users: chmod 600 $token_file" >&2; exit 1 ;;
esac
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_file"
unset RAY_AUTH_TOKEN  # it would take precedence over the file

gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)  # 0 on a node without NVIDIA GPUs
case "$role" in
  head) ray start --head --port=6379 --dashboard-host=0.0.0.0 --num-gpus="$gpus" ;;
  worker) ray start --address="${2:?head address}:6379" --num-gpus="$gpus" ;;
  *) echo "usage: $0 token | head | worker HEAD_IP" >&2; exit 2 ;;
esac
