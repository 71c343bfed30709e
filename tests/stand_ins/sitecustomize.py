"""Put on PYTHONPATH by the test harness for its subprocesses (never by the package): Python 3.12's
``typing.override``, which Megatron-LM's ``megatron.training`` (megatron-core 0.19 wheels) imports,
for Python 3.11."""

import typing

if not hasattr(typing, "override"):
    typing.override = lambda method: method
