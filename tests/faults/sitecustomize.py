"""Fault injection for tests/test_reliability.py, loaded only when this folder is on PYTHONPATH.

With ``FNPRUNE_KILL=<script>`` set, the workflow script whose file name ends in ``<script>.py``
(Snakemake copies scripts as ``tmpXXXX.<name>.py``) kills itself with SIGKILL in the middle of
writing its outputs: after filling part of a memory-mapped activation shard (extract) or after
writing half of an ``.npz`` (ica). No other process is touched.
"""

import os
import signal
import sys

_target = os.environ.get("FNPRUNE_KILL")
if _target and sys.argv and sys.argv[0].endswith(f".{_target}.py"):
    import numpy as np
    import numpy.lib.format as fmt

    def _die():
        os.kill(os.getpid(), signal.SIGKILL)

    if _target == "extract":
        _open = fmt.open_memmap
        _count = {"n": 0}

        def open_memmap(*args, **kwargs):
            _count["n"] += 1
            if _count["n"] == 3:
                arr = _open(*args, **kwargs)
                arr[: max(1, len(arr) // 2)] = 1
                arr.flush()
                _die()
            return _open(*args, **kwargs)

        fmt.open_memmap = open_memmap
        np.lib.format.open_memmap = open_memmap
    else:
        _savez = np.savez

        def savez(file, *args, **kwargs):
            _savez(file, *args, **kwargs)
            with open(file, "r+b") as f:
                f.truncate(os.path.getsize(file) // 2)
            _die()

        np.savez = savez
