# Source on the device machine: the carried wheels into /tmp/site (once a machine), ftpipe from the checkout.
if [ ! -f /tmp/site/.done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${WHEELS:-.whl_min}"/*.whl && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FTPIPE_CACHE=${FTPIPE_CACHE:-/tmp/ftcache}
