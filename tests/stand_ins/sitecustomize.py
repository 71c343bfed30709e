"""Put on PYTHONPATH by the test harness for its subprocesses (never by the package): Python 3.12's
``typing.override``, which Megatron-LM's ``megatron.training`` (megatron-core 0.19 wheels) imports,
for Python 3.11."""

import typing

if not hasattr(typing, "override"):
    typing.override = lambda method: method

# Fault injection for tests/test_faults.py: with MOE_REG_TEST_FAIL_WRITES=SUBSTRING, opening a file for
# writing whose path contains SUBSTRING fails as a full disk does (tests run as root: permissions would
# not stop the write).
import os as _os

_FAIL_WRITES = _os.environ.get("MOE_REG_TEST_FAIL_WRITES")
if _FAIL_WRITES:
    import builtins
    import errno
    import io

    _open = io.open

    def _failing_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and _FAIL_WRITES in str(file):
            raise OSError(errno.ENOSPC, _os.strerror(errno.ENOSPC), str(file))
        return _open(file, mode, *args, **kwargs)

    io.open = builtins.open = _failing_open
