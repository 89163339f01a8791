# Source on the device machine after scripts/device/setup.sh: flash-attn-4 into /tmp/site from the two parts that
# scripts/device/fa4_wheels.sh makes. The call before this one carried DIR/a and copied it to /tmp/fa4_a
# (`mkdir -p /tmp/fa4_a && cp .whl_fa4/a/* /tmp/fa4_a/`); this one carries DIR/b.
fa4="${FA4:-.whl_fa4}"
if [ ! -f /tmp/site/.fa4_done ]; then
    [ -f /tmp/fa4_a/path ] || { echo "fa4_setup: no /tmp/fa4_a: part a went to another machine"; return 1; }
    python3 - "$fa4/b/rest.tar.xz" /tmp/fa4_a <<'PY' || return 1
import lzma, shutil, sys, tarfile
from pathlib import Path
rest, part_a = sys.argv[1], Path(sys.argv[2])
tarfile.open(rest).extractall("/tmp/site", filter="tar")
with lzma.open(part_a / "ir.so.xz") as src, open(Path("/tmp/site") / (part_a / "path").read_text().strip(), "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    touch /tmp/site/.fa4_done
fi
# what the package's .pth file adds in a site-packages folder, which a PYTHONPATH entry does not read
export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
