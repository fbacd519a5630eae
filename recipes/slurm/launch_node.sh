#!/bin/bash
# One machine's share of a multi-machine run: `accelerate launch` with this machine's rank. recipes/slurm/train.sbatch
# runs it once per machine through srun; it reads the job from the environment:
#   SLURM_NNODES       machines in the job                   -> --num_machines
#   SLURM_NODEID       this machine's index, 0 .. NNODES-1   -> --machine_rank
#   GPUS_PER_NODE      processes per machine                 -> --num_processes = SLURM_NNODES x GPUS_PER_NODE
#   MAIN_PROCESS_IP    address of machine 0                  -> --main_process_ip
#   MAIN_PROCESS_PORT  its rendezvous port (default 29500)   -> --main_process_port
# Usage: launch_node.sh ACCELERATE_CONFIG SCRIPT [SCRIPT ARGS...]
set -euo pipefail

config=${1:?usage: launch_node.sh ACCELERATE_CONFIG SCRIPT [SCRIPT ARGS...]}
shift
: "${SLURM_NNODES:?not set: run under SLURM (srun) or set it}" "${SLURM_NODEID:?not set: run under SLURM or set it}"
: "${GPUS_PER_NODE:?not set: the processes to start on each machine}" "${MAIN_PROCESS_IP:?not set: machine 0 address}"

# Every machine runs torchrun itself (srun started one task on each), so DeepSpeed configs use the "standard"
# multi-node launcher here rather than ssh from a hostfile.
exec accelerate launch --config_file "$config" \
    --num_machines "$SLURM_NNODES" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    --deepspeed_multinode_launcher standard \
    "$@"
