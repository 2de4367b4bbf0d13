#!/bin/bash
# Pretrain across nodes without Slurm: run this on every node, with the same arguments but each its own node rank.
#
#   launch/torchrun.sh NNODES NODE_RANK HOST:PORT [--procs-per-node N] [--python PY] --config X.yaml [overrides]
#
#   node 0 (HOST):  launch/torchrun.sh 2 0 10.0.0.1:29500 --procs-per-node 8 --config launch/configs/1b.yaml
#   node 1:         launch/torchrun.sh 2 1 10.0.0.1:29500 --procs-per-node 8 --config launch/configs/1b.yaml
#
# HOST:PORT is node 0's address and a free port there (rank 0 listens on it); --procs-per-node defaults to the
# number of GPUs the node sees (1 without any). Run it from the repository, on a file system every node shares.
# Exit status: on node 0, launch/pretrain.py's, read from the run directory's record of this attempt (0 done, 3
# stopped after saving: run the same commands again to resume, 2 bad configuration/data/checkpoint, 4 non-finite,
# 5 run directory busy, 1 anything else), not torchrun's own (which is 1 for every one of them but 0); on the
# other nodes, torchrun's. A stop signal (TERM, INT or USR1) to this script is passed to torchrun as TERM, and by
# torchrun to the ranks: they save and exit 3 (torchrun waits for them up to an hour, the ranks' own limit is
# train.stop_grace_seconds).
set -uo pipefail

usage() { echo "usage: $0 NNODES NODE_RANK HOST:PORT [--procs-per-node N] [--python PY] --config X.yaml [overrides]" >&2; exit 2; }
[ $# -ge 4 ] || usage
nnodes=$1 node_rank=$2 endpoint=$3
shift 3
python=${PYTHON:-python} nproc=""
while [ $# -gt 0 ] && [ "$1" != "--config" ]; do
    case "$1" in
        --procs-per-node) nproc=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        *) echo "error: unknown option $1 (options of this script come before --config)" >&2; usage ;;
    esac
done
[ $# -gt 0 ] || usage
case "$nnodes$node_rank" in *[!0-9]*) echo "error: NNODES and NODE_RANK must be numbers" >&2; usage ;; esac
[ "$node_rank" -lt "$nnodes" ] || { echo "error: NODE_RANK $node_rank is not below NNODES $nnodes" >&2; exit 2; }
host=${endpoint%:*} port=${endpoint##*:}
[ -n "$host" ] && [ "$host" != "$endpoint" ] && [ -n "$port" ] || {
    echo "error: the rendezvous endpoint must be HOST:PORT, not $endpoint" >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 1

if [ -z "$nproc" ]; then
    nproc=$("$python" -c "import torch; print(max(torch.cuda.device_count(), 1))") || exit 1
fi
"$python" launch/attempt.py check "$@" >/dev/null || exit 2   # a bad config stops here, on every node

export PRETRAIN_ATTEMPT_ID="torchrun-$(date -u +%Y%m%dT%H%M%S)-$host-$port"
pid="" asked=""
trap 'asked=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM INT USR1
"$python" -m torch.distributed.run --nnodes="$nnodes" --node-rank="$node_rank" --nproc-per-node="$nproc" \
    --master-addr="$host" --master-port="$port" --max-restarts=0 --shutdown-timeout=3600 launch/pretrain.py "$@" &
pid=$!
[ -n "$asked" ] && kill -TERM "$pid" 2>/dev/null   # a stop asked for before torchrun started
while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"   # returns early when a trapped signal comes: torchrun is still stopping the ranks
done
wait "$pid"; status=$?   # torchrun's own status (bash keeps it)
[ "$node_rank" -eq 0 ] || exit "$status"
"$python" launch/attempt.py status --otherwise "$status" "$@"
