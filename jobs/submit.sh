#!/usr/bin/env bash
# Submit one stage as a Ray job:  jobs/submit.sh STAGE CONFIG [key.sub=value ...]
# RAY_ADDRESS names the cluster's dashboard (default http://127.0.0.1:8265); the script says which
# cluster it sends to, so a node shared with another Ray cluster is no surprise. Token auth stays on:
# the client sends ~/.ray/auth_token (copy it from the head) because RAY_AUTH_MODE=token.
# The teacher key is never passed here: the cluster's nodes hold it in their own environment.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: jobs/submit.sh STAGE CONFIG [key.sub=value ...]" >&2
  exit 2
fi
stage=$1 config=$2
shift 2
[ -f "$config" ] || { echo "no such config: $config" >&2; exit 2; }
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
if [ -n "${RAY_ADDRESS:-}" ]; then from="RAY_ADDRESS"; else from="the default: set RAY_ADDRESS for another"; fi
echo "jobs/submit.sh: sending $stage to the Ray cluster at $address ($from)" >&2
exec ray job submit \
  --address "$address" \
  --runtime-env cluster/runtime_env.yaml \
  --metadata-json "{\"stage\": \"$stage\", \"config\": \"$config\"}" \
  -- python -m huatuo_ray "$stage" --config "$config" "$@"
