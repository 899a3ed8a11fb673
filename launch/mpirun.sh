#!/usr/bin/env bash
# Run a command on several ranks with mpiexec, MPICH (Hydra) or Open MPI.
#
#   launch/mpirun.sh [MPIEXEC OPTIONS...] [--] COMMAND [ARGS...]
#
#   launch/mpirun.sh -n 2 kvdist demo
#   launch/mpirun.sh -n 4 python -m kvdist.cli.env
#   launch/mpirun.sh -n 4 -m kvdist.cli.env              (-m MODULE: python -m MODULE)
#   MPICH:    launch/mpirun.sh -n 8 -f hosts -ppn 4 -genv NCCL_DEBUG INFO kvdist bench engine
#   Open MPI: launch/mpirun.sh -n 8 --hostfile hosts -x NCCL_DEBUG=INFO kvdist bench engine
#
# Options before COMMAND go to mpiexec unchanged. -genv, -env and --mca take two words;
# known flags (-l, --tag-output, ...) and --opt=value none; any other option takes the
# next word as its value, unless that word is an option itself, `kvdist` or python
# (python, python3, python3.N, also given by path: an unknown flag just before the
# command leaves the command alone). The rank count: -n N or -np N, also with -- or
# =N (-n=N, --np=N), but not -nN, which neither MPI reads. Put `--` before
# COMMAND when in doubt. On one node both
# MPIs hand the whole environment to every rank; across nodes MPICH forwards it all by
# default, Open MPI only the variables named with -x (the script names kvdist's KVDIST_*
# settings: ranks whose control plane or deadline differ wait on each other).
# `kvdist` runs `python -m kvdist.cli.main` when no kvdist executable is on PATH.
#
# Settings (environment):
#   KVDIST_MPIEXEC  the mpiexec to run, with options of its own after it, split at spaces
#                   (default: mpiexec on PATH; e.g. "/opt/ompi/bin/mpirun --mca btl ^openib")
#   KVDIST_PYTHON   python for `kvdist` and `-m MODULE` (default: python3, else python)
# Open MPI also gets --oversubscribe (CI runs more ranks than cores), as root
# --allow-run-as-root, and --bind-to none unless a binding or mapping option (or its MCA
# parameter, hwloc_base_binding_policy or rmaps_base_mapping_policy) is given: by
# default it binds each of up to two ranks to one core, where the rank's helper threads
# (NCCL's, kvdist's IO) take turns with its Python thread. MPICH needs none of them.
set -euo pipefail

# usage 0: asked for (stdout, exit 0); usage: a mistake (stderr, exit 2).
usage() {
  local text; text=$(sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//')
  if [ "${1:-2}" = 0 ]; then echo "$text"; exit 0; fi
  echo "$text" >&2; exit 2
}
count() {  # a rank count: a positive integer
  [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "mpirun.sh: $1 needs a positive number of ranks, got '${2:-}'" >&2; exit 2; }
}
# Where COMMAND starts: `kvdist` or a python, by name or by path (a venv's, sys.executable).
is_command() { [[ ${1##*/} =~ ^(kvdist|python|python3|python3\.[0-9]+)$ ]]; }

# Words, as torchrun.sh reads KVDIST_TORCHRUN: the program, then options of its own.
read -r -a mpiexec_cmd <<< "${KVDIST_MPIEXEC:-}"
[ ${#mpiexec_cmd[@]} -gt 0 ] || mpiexec_cmd=(mpiexec)
mpiexec_bin=${mpiexec_cmd[0]}
if ! command -v "$mpiexec_bin" >/dev/null; then
  echo "mpirun.sh: '$mpiexec_bin' not found; install MPI (pip install mpich) or set KVDIST_MPIEXEC" >&2
  exit 127
fi
python_bin=${KVDIST_PYTHON:-$(command -v python3 || command -v python)}

opts=()
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; break ;;
    -m) break ;;
    -h|--help) usage 0 ;;
    -n|-np|--n|--np|-c) count "$1" "${2:-}"; opts+=("$1" "$2"); shift 2 ;;
    -n=*|-np=*|--n=*|--np=*|-c=*) count "${1%%=*}" "${1#*=}"; opts+=("$1"); shift ;;
    -n[0-9]*|-np[0-9]*|--n[0-9]*|--np[0-9]*|-n-*|-np-*|--n-*|--np-*)
      # Neither MPI reads -n2 (Hydra: "unrecognized argument n2"): check it, then say how.
      [[ $1 =~ ^(--?np?)(.*)$ ]]; flag=${BASH_REMATCH[1]} n=${BASH_REMATCH[2]}
      count "$flag" "$n"
      echo "mpirun.sh: write the rank count as its own word, '$flag $n', not '$1'" >&2; exit 2 ;;
    -genv|-env)  # NAME VALUE, or NAME=VALUE
      case ${2:-} in
        *=*) opts+=("$1" "$2"); shift 2 ;;
        *) [ $# -ge 3 ] || { echo "mpirun.sh: $1 needs NAME VALUE or NAME=VALUE" >&2; exit 2; }
           opts+=("$1" "$2" "$3"); shift 3 ;;
      esac ;;
    --mca|-mca|-gmca)
      [ $# -ge 3 ] || { echo "mpirun.sh: $1 needs a name and a value" >&2; exit 2; }
      opts+=("$1" "$2" "$3")
      shift 3 ;;
    -l|-prepend-rank|--tag-output|--timestamp-output|--report-bindings|-v|--verbose|-q|--quiet|\
    -genvall|-genvnone|--oversubscribe|--allow-run-as-root|--display-map|--noprefix|\
    --use-hwthread-cpus|--nolocal)
      opts+=("$1"); shift ;;
    -*=*) opts+=("$1"); shift ;;
    -*)
      if [[ -z ${2:-} || $2 == -* ]] || is_command "$2"; then
        opts+=("$1"); shift  # a flag mpirun.sh does not know
      else
        opts+=("$1" "$2"); shift 2
      fi ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "mpirun.sh: no COMMAND to run" >&2; usage; }

case $1 in
  kvdist) command -v kvdist >/dev/null || { shift; set -- "$python_bin" -m kvdist.cli.main "$@"; } ;;
  -m) shift; set -- "$python_bin" -m "$@" ;;
esac

extra=()
# The options given: KVDIST_MPIEXEC's own and those on the command line.
given=("${mpiexec_cmd[@]:1}" ${opts[@]+"${opts[@]}"})
case $("$mpiexec_bin" --version 2>&1 || true) in
  *"Open MPI"*|*OpenRTE*)
    has() { local o; for o in ${given[@]+"${given[@]}"}; do [ "$o" = "$1" ] && return 0; done; return 1; }
    has_prefix() { local o; for o in ${given[@]+"${given[@]}"}; do [[ $o == "$1"* ]] && return 0; done; return 1; }
    has --oversubscribe || extra+=(--oversubscribe)
    if [ "$(id -u)" -eq 0 ] && ! has --allow-run-as-root; then extra+=(--allow-run-as-root); fi
    binds=no
    # Also a policy set as an MCA parameter (--mca NAME VALUE, or OMPI_MCA_NAME in the
    # environment): --bind-to none on the command line would override it.
    [ -z "${OMPI_MCA_hwloc_base_binding_policy:-}${OMPI_MCA_rmaps_base_mapping_policy:-}" ] ||
      binds=yes
    for o in ${given[@]+"${given[@]}"}; do
      case $o in
        --bind-to|-bind-to|--bind-to=*|-bind-to=*|--map-by|-map-by|--map-by=*|-map-by=*|\
        --cpu-set|--cpu-list|--rankfile|-rf|--rankfile=*|\
        hwloc_base_binding_policy|rmaps_base_mapping_policy) binds=yes ;;
      esac
    done
    [ $binds = yes ] || extra+=(--bind-to none)
    for v in $(compgen -e); do
      case $v in
        KVDIST_MPIEXEC|KVDIST_PYTHON) ;;  # this script's own
        KVDIST_*) has "$v" || has_prefix "$v=" || extra+=(-x "$v") ;;  # unless -x names it
      esac
    done ;;
esac

exec "${mpiexec_cmd[@]}" ${extra[@]+"${extra[@]}"} ${opts[@]+"${opts[@]}"} "$@"
