#!/usr/bin/env bash
# The 8B demo at TP 2 (bf16, mpirun) for the code of commit 2165f79 (this session's start;
# extracted beforehand into ab_old/ with `git archive 2165f79 kvdist launch`) and the final
# code, alternated twice on one host: whether this session's changes (the plan checks, the
# dropped saves) changed the demo's TTFT (the final run gave 421 -> 368 ms under mpirun and
# 423 -> 424 ms under torchrun). Writes $OUT/ab_demo.tgz. From the repository root:
#   OUT=dir bash benchmarks/results/gpu/session_end_nov30/ab_demo.sh
set -u
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
out=$OUT/ab_demo; mkdir -p $out
demo="kvdist demo --device cuda --model llama3-8b --prompts 8 --prefix-len 1008 --suffix-len 16"
for round in 1 2; do
  for code in old new; do
    if [ $code = old ]; then root=$PWD/ab_old; else root=$PWD; fi
    (cd $root && PYTHONPATH=$root timeout 120 launch/mpirun.sh -n 2 $demo > $out/demo_${code}_$round.txt 2>&1)
    echo "$code $round: $(grep -E '^\| [12]:' $out/demo_${code}_$round.txt | awk -F'|' '{printf "%s ", $3}') $(tail -n 1 $out/demo_${code}_$round.txt)"
  done
done
cd $OUT && tar czf ab_demo.tgz ab_demo && rm -rf ab_demo
