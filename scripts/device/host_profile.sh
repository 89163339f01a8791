#!/usr/bin/env bash
# Where the host's time goes in steady training (issue 18: the compiled step waits on the host): the `ftpipe`
# command of each of CASES under py-spy (carried as a wheel in .whl_bench; sampling without pausing the
# process), then each of PROFILE_CASES with torch.profiler's summary of a few steady steps. Usage (device):
#   CASES=lora,qlora PROFILE_CASES=qwen7b_qlora STEPS=40 bash scripts/device/host_profile.sh
# Results: $OUT/host.tgz (logs, command.json, pyspy_CASE.raw.gz: collapsed stacks, `scripts/host_profile.py`
# sums them up; the profiled runs' summary.json).
set -uo pipefail
export WHEELS=${WHEELS:-.whl_bench}
source scripts/device/setup.sh
unset PYTHONDONTWRITEBYTECODE  # the image sets it: every import would compile from source (not a user's install)
CASES=${CASES:-lora} PROFILE_CASES=${PROFILE_CASES-} STEPS=${STEPS:-40}
mkdir -p /tmp/host
for case in ${CASES//,/ }; do
    /tmp/site/bin/py-spy record --subprocesses --threads --nonblocking --rate 400 --format raw -o /tmp/host/pyspy_$case.raw \
        -- python scripts/bench_command.py /tmp/host/$case --cases $case --steps $STEPS > /tmp/host/$case.log 2>&1
    gzip -f /tmp/host/pyspy_$case.raw
    grep -h "^$case: {" /tmp/host/$case.log | cut -c1-300
done
for case in ${PROFILE_CASES//,/ }; do
    spec="$case@train.profile.steps=3@train.profile.start=15"
    python scripts/bench_command.py /tmp/host/prof_$case --cases "$spec" --steps 25 > /tmp/host/prof_$case.log 2>&1
    find /tmp/host/prof_$case/cache -name summary.json -path '*profile*' -exec cp {} /tmp/host/summary_$case.json \;
    grep -h "^$case.*: {" /tmp/host/prof_$case.log | cut -c1-300
    grep -h "profiled steps" -r /tmp/host/prof_$case/*.log | tail -1
done
find /tmp/host -name 'trace.json.gz' -delete
tar czf $OUT/host.tgz -C /tmp --exclude=cache --exclude='corpus*' host
