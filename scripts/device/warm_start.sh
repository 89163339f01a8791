#!/usr/bin/env bash
# Issue 18's warm start on one GPU machine: CASE's first run (compiles) with its rerun (under cProfile unless
# CPROFILE is empty), then, for each of VARIANTS (environment settings, "-" for none), another pair of runs,
# both warm (the compiled artefacts are shared through $FTPIPE_CACHE/build; the second run of a pair finds
# every stage before train in the cache: the warm start). Usage (device, carrying .whl_bench):
#   CASE=lora STEPS=10 VARIANTS="- TORCHINDUCTOR_COMPILE_THREADS=1" [TAG=warm] bash scripts/device/warm_start.sh
# Results: $OUT/TAG.tgz (each run's logs and command.json, the .prof); the first-step lines on stdout.
set -uo pipefail
export WHEELS=${WHEELS:-.whl_bench}
source scripts/device/setup.sh
[ -f /tmp/site/.fa4_done ] && source scripts/device/fa4_setup.sh  # flash-attn-4 where an earlier call unpacked it
unset PYTHONDONTWRITEBYTECODE  # the image sets it: every import would compile from source (not a user's install)
CASE=${CASE:-lora} STEPS=${STEPS:-10} TAG=${TAG:-warm} CPROFILE=${CPROFILE-1}
mkdir -p /tmp/${TAG}0
python scripts/bench_command.py /tmp/${TAG}0 --cases $CASE --steps $STEPS --warm $CASE \
    ${CPROFILE:+--warm-cprofile} > /tmp/${TAG}0/stdout.log 2>&1
i=0
for variant in ${VARIANTS:--}; do
    i=$((i + 1))
    mkdir -p /tmp/$TAG$i && echo "$TAG variant $i: $variant" > /tmp/$TAG$i/variant.txt
    ([ "$variant" != - ] && export "$variant"; python scripts/bench_command.py /tmp/$TAG$i --cases $CASE \
        --steps $STEPS --warm $CASE > /tmp/$TAG$i/stdout.log 2>&1)
done
tar czf $OUT/$TAG.tgz -C /tmp --exclude=cache --exclude='corpus*' $(cd /tmp && ls -d $TAG[0-9]*)
for f in /tmp/$TAG[0-9]*/*.txt /tmp/$TAG[0-9]*/*.log; do
    echo "== $f"; grep -h -o "first optimizer step.*\|model built.*\|tokens/s steady.*\|^$TAG variant.*\|waited.*" $f
done
