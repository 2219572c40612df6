"""``python -m llmos.bench.peer_server ARGS``: llama-cpp-python's ``llama_cpp.server`` on this machine's CPU path.

Contract: decides the llama.cpp CPU path exactly as llmos does (:func:`llmos.engine.backends.llamacpp_path.choose`:
explicit setting, cached probe verdict, or a probe) and applies it (library directory, ``use_extra_bufts``) before
``llama_cpp`` loads, then runs ``llama_cpp.server`` with ``ARGS`` unchanged. The benchmarks start the peer through
this module, so that both sides run the same kernels, and so that the peer does not crash on a CPU whose fast path
faults (where plain ``python -m llama_cpp.server`` dies at its first request). The peer runs llama.cpp's stock
attention kernels: llmos's batch-invariance switch (``LLMOS_BATCH_INVARIANT``, which a parent llmos process may have
set) is removed from its environment.
"""

from __future__ import annotations

import os
import runpy

from llmos.engine.backends.llamacpp_path import choose


def main() -> None:
    os.environ.pop("LLMOS_BATCH_INVARIANT", None)
    choose()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
