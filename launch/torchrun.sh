#!/usr/bin/env bash
# Run a command on several ranks with torchrun.
#
#   launch/torchrun.sh [-n N] [TORCHRUN OPTIONS...] [--] COMMAND [ARGS...]
#
#   launch/torchrun.sh -n 2 kvdist demo
#   launch/torchrun.sh -n 2 python -m kvdist.cli.env
#   launch/torchrun.sh -n 2 -m kvdist.cli.env              (-m MODULE: python -m MODULE)
#   launch/torchrun.sh -n 2 python my_script.py --flag
# Several nodes (run the same line on every node):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh -n 4 kvdist bench engine
#   NNODES=2 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 launch/torchrun.sh -n 4 kvdist bench engine
#
# -n N is --nproc-per-node N. The rendezvous comes from the settings below, never from
# torchrun's --nnodes, --node-rank, --master-addr/port or --rdzv-endpoint/id/backend
# (refused: they would meet the script's --standalone and each node would wait alone),
# nor from an abbreviation torchrun would read as one of them (--nnode, --master-ad).
# Such an abbreviation of an option the script reads itself is that option (--nproc 2).
# Other options before COMMAND go to torchrun unchanged; one
# takes the next word as its value unless written --opt=value, a known flag, or followed
# by an option, `kvdist` or `python...` (put `--` before COMMAND when in doubt). On one
# node the job uses --standalone (rendezvous on a free port). `kvdist` runs the CLI module
# (`-m kvdist.cli.main`), `python -m MOD` and `python FILE` run in torchrun's python, any
# other command through --no-python (after a --no-python of your own, every COMMAND runs
# as given).
#
# Settings (environment):
#   KVDIST_TORCHRUN  the torchrun to run (default: torchrun on PATH, else python -m torch.distributed.run)
#   NPROC_PER_NODE   ranks per node when -n is not given (default 1)
#   NNODES           number of nodes (default 1; MIN:MAX with RDZV_ENDPOINT)
#   NODE_RANK, MASTER_ADDR, MASTER_PORT   static rendezvous on several nodes
#                    (NODE_RANK 0 .. NNODES-1, MASTER_PORT 1 .. 65535)
#   RDZV_ENDPOINT, RDZV_ID, RDZV_BACKEND  elastic rendezvous instead (RDZV_BACKEND default c10d)
set -euo pipefail

# usage 0: asked for (stdout, exit 0); usage: a mistake (stderr, exit 2).
usage() {
  local text; text=$(sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//')
  if [ "${1:-2}" = 0 ]; then echo "$text"; exit 0; fi
  echo "$text" >&2; exit 2
}
bad() { echo "torchrun.sh: $*" >&2; exit 2; }
# Where COMMAND starts: `kvdist` or a python, by name or by path (a venv's, sys.executable).
is_command() { [[ ${1##*/} =~ ^(kvdist|python|python3|python3\.[0-9]+)$ ]]; }

python_bin=$(command -v python3 || command -v python)
if [ -n "${KVDIST_TORCHRUN:-}" ]; then
  read -r -a torchrun_cmd <<< "$KVDIST_TORCHRUN"
elif command -v torchrun >/dev/null; then
  torchrun_cmd=(torchrun)
else
  torchrun_cmd=("$python_bin" -m torch.distributed.run)
fi

# torchrun's long options (`python -m torch.distributed.run --help`), each of two or more
# words also spelled with `_`. Its argparse takes any unambiguous prefix of one.
torchrun_options=(
  duplicate-stderr-filters duplicate-stdout-filters event-log-handler help local-addr
  local-ranks-filter log-dir logs-specs master-addr master-port max-restarts module
  monitor-interval nnodes no-python node-rank nproc-per-node numa-binding rdzv-backend
  rdzv-conf rdzv-endpoint rdzv-id redirects role run-path shutdown-timeout
  signals-to-handle standalone start-method tee virtual-local-rank
)
# The option torchrun reads an abbreviation as (`--nnode`, `--node_r`: --nnodes,
# --node-rank); nothing for a whole option name, an ambiguous prefix or no option's.
full_option() {
  local word=${1#--} o found=
  word=${word//_/-}
  for o in "${torchrun_options[@]}"; do
    [ "$o" != "$word" ] || return 0
    if [[ $o == "$word"* ]]; then
      [ -z "$found" ] || return 0
      found=$o
    fi
  done
  [ -z "$found" ] || echo "--$found"
}

nproc=${NPROC_PER_NODE:-1}
standalone=no no_python=no
opts=()
while [ $# -gt 0 ]; do
  # An abbreviation of an option the script reads is that option (the value kept).
  said=${1%%=*} short=
  if [[ $1 == --?* ]]; then
    full=$(full_option "${1%%=*}")
    case $full in
      --nproc-per-node|--nnodes|--node-rank|--master-addr|--master-port|--rdzv-endpoint|\
      --rdzv-id|--rdzv-backend|--standalone|--no-python|--run-path)
        short=" (short for $full)"
        set -- "$full${1#"${1%%=*}"}" "${@:2}" ;;
    esac
  fi
  case $1 in
    --) shift; break ;;
    -m) break ;;
    -h|--help) usage 0 ;;
    -n|--nproc-per-node|--nproc_per_node)
      [ $# -ge 2 ] || bad "$1 needs a value"
      nproc=$2; shift 2 ;;
    --nproc-per-node=*|--nproc_per_node=*) nproc=${1#*=}; shift ;;
    # The rendezvous comes from the environment: torchrun's own options beside the
    # script's --standalone would leave each node waiting alone for the others.
    --nnodes|--nnodes=*|--node[-_]rank|--node[-_]rank=*|--master[-_]addr|--master[-_]addr=*|\
    --master[-_]port|--master[-_]port=*|--rdzv[-_]endpoint|--rdzv[-_]endpoint=*|\
    --rdzv[-_]id|--rdzv[-_]id=*|--rdzv[-_]backend|--rdzv[-_]backend=*)
      name=${1%%=*} var=${name#--} var=${var//-/_}
      bad "set ${var^^} in the environment instead of $said$short (the script builds the rendezvous from NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT or RDZV_ENDPOINT, RDZV_ID, RDZV_BACKEND)" ;;
    --standalone) standalone=yes; shift ;;
    --no-python|--no_python) no_python=yes; opts+=("$1"); shift ;;
    --run-path|--run_path) opts+=("$1"); shift ;;
    -*=*) opts+=("$1"); shift ;;
    -*)
      if [[ -z ${2:-} || $2 == -* ]] || is_command "$2"; then
        opts+=("$1"); shift  # a flag torchrun.sh does not know
      else
        opts+=("$1" "$2"); shift 2
      fi ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "torchrun.sh: no COMMAND to run" >&2; usage; }
[[ $nproc =~ ^([1-9][0-9]*|auto|cpu|gpu|xpu)$ ]] ||
  bad "-n needs a positive number of ranks per node, got '$nproc'"

# Checked here: torchrun waits forever for a node rank that cannot join, and answers a
# bad number with a traceback.
nnodes=${NNODES:-1}
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  [[ $nnodes =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] && (( ${nnodes#*:} >= ${nnodes%%:*} )) ||
    bad "NNODES needs a positive number of nodes or MIN:MAX, got '$nnodes'"
  rdzv=(--nnodes "$nnodes" --rdzv-backend "${RDZV_BACKEND:-c10d}" --rdzv-endpoint "$RDZV_ENDPOINT"
        --rdzv-id "${RDZV_ID:-kvdist}")
else
  [[ $nnodes =~ ^[1-9][0-9]*$ ]] || bad "NNODES needs a positive number of nodes, got '$nnodes'"
  # Also on one node: a NODE_RANK of 1 or more there means NNODES was left out.
  if [ -n "${NODE_RANK:-}" ]; then
    [[ $NODE_RANK =~ ^(0|[1-9][0-9]*)$ ]] && (( NODE_RANK < nnodes )) ||
      bad "NODE_RANK needs a node number below NNODES=$nnodes, got '$NODE_RANK'"
  fi
  if [ "$nnodes" != 1 ]; then
    for v in NODE_RANK MASTER_ADDR MASTER_PORT; do
      [ -n "${!v:-}" ] || bad "NNODES=$nnodes needs $v set (on every node)"
    done
    [[ $MASTER_PORT =~ ^[1-9][0-9]{0,4}$ ]] && (( MASTER_PORT <= 65535 )) ||
      bad "MASTER_PORT needs a port number 1-65535, got '$MASTER_PORT'"
    rdzv=(--nnodes "$nnodes" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
          --master-port "$MASTER_PORT")
  else
    rdzv=(--standalone)
  fi
fi
# The script adds --standalone on one node itself; on several it would split the nodes.
[ $standalone = no ] || [ "${rdzv[0]}" = --standalone ] ||
  bad "--standalone runs one node on its own, but a shared rendezvous is set (NNODES=$nnodes${RDZV_ENDPOINT:+, RDZV_ENDPOINT=$RDZV_ENDPOINT}): leave out --standalone"

case $no_python:$1 in
  yes:*) ;;  # the user's own --no-python: COMMAND runs as given
  no:kvdist) shift; set -- -m kvdist.cli.main "$@" ;;
  no:-m) ;;
  no:python|no:python3|no:"$python_bin")
    [ $# -gt 1 ] || bad "python needs a script or -m MODULE"
    case $2 in
      -m|[!-]*) shift ;;  # torchrun starts its own python: keep `-m MOD ...` or `FILE ...`
      *) set -- --no-python "$@" ;;  # python's own flags (-u, -c, -X ...): run it as given
    esac ;;
  *) set -- --no-python "$@" ;;
esac

exec "${torchrun_cmd[@]}" --nproc-per-node "$nproc" "${rdzv[@]}" ${opts[@]+"${opts[@]}"} "$@"
