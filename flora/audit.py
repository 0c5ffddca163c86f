"""Optional file-access log of a FLoRA app process (how the deployment test shows who reads which data).

With ``FLORA_OPEN_LOG=DIR`` in its environment, a ServerApp or ClientApp process appends the path of every
file it opens (Python's ``open`` audit event: ``open()``, ``Path.read_text``, ``os.open``, ...) to
``DIR/<role>-<pid>.log``. Files opened by native code that bypasses Python's I/O (e.g. a tokenizer's Rust
reader) are not seen. Off unless the variable is set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_installed: set[str] = set()


def install_open_log(role: str) -> None:
    """Log this process's file opens under ``role`` if ``FLORA_OPEN_LOG`` is set (once per process and role)."""
    directory = os.environ.get("FLORA_OPEN_LOG")
    if not directory or role in _installed:
        return
    _installed.add(role)
    handle = open(Path(directory) / f"{role}-{os.getpid()}.log", "a", buffering=1)  # opened before the hook

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            handle.write(os.fsdecode(args[0]) + "\n")

    sys.addaudithook(hook)
