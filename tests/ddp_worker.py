"""Run `mproxy ARGS` as one torchrun rank, recording which files this rank wrote (renamed into place).

The rank's pid goes to `$WRITES_LOG.rankN.pid` first: torchrun starts every worker in a session of its own, so
killing the launcher's process group leaves the workers running; a test that kills a run kills them by pid.
Whether a torch.distributed process group is still initialised when `mproxy` returns or raises goes to
`$WRITES_LOG.rankN.group` ("initialised" or "none").
"""

import json
import os
import sys

real_replace = os.replace
written = []


def recording_replace(src, dst, *args, **kwargs):
    written.append(str(dst))
    return real_replace(src, dst, *args, **kwargs)


os.replace = recording_replace
log = os.environ["WRITES_LOG"] + f".rank{os.environ.get('RANK', '0')}"
with open(log + ".pid", "w") as f:
    f.write(str(os.getpid()))
from momentum_proxy.cli import main  # noqa: E402

try:
    main(sys.argv[1:])
finally:
    with open(log, "w") as f:
        json.dump(written, f)
    import torch.distributed as dist

    with open(log + ".group", "w") as f:
        f.write("initialised" if dist.is_initialized() else "none")
