# Source on the device machine: the carried wheels (scripts/device/wheels.sh builds them) into /tmp/site, once a
# machine and again when the set of wheels changed; ftpipe from the checkout.
wheels="${WHEELS:-.whl_min}"
if [ "$(cat /tmp/site/.done 2>/dev/null)" != "$(ls "$wheels")" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheels"/*.whl && ls "$wheels" > /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FTPIPE_CACHE=${FTPIPE_CACHE:-/tmp/ftcache}
