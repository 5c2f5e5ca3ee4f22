"""Run `mproxy ARGS` as one torchrun rank, recording which files this rank wrote (renamed into place)."""
import json
import os
import sys

real_replace = os.replace
written = []


def recording_replace(src, dst, *args, **kwargs):
    written.append(str(dst))
    return real_replace(src, dst, *args, **kwargs)


os.replace = recording_replace
from momentum_proxy.cli import main  # noqa: E402

try:
    main(sys.argv[1:])
finally:
    with open(os.environ["WRITES_LOG"] + f".rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(written, f)
