"""Simulate a CPU whose llama.cpp fast path faults: ``PYTHONPATH=$PWD/tests/simulate_amx_fault pytest``.

Some virtual machines advertise AMX but fault on it: every model that the installed llama.cpp build loads with its
extra buffer types on dies at its first decode (SIGILL / general protection fault in ggml_backend_amx_mul_mat), in
any program. With this directory on PYTHONPATH, every Python process (pytest, the CLI, servers, job workers, Ray
workers, llmos's probe child) behaves like that: loading a model from the installed build (``llama_cpp/lib``) with
``use_extra_bufts`` kills the process by SIGILL, while a variant build elsewhere (the no-AMX build) and the safe path
run. The suite must pass under it with no other variable set (an absolute path: probe children run elsewhere).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any


def _fault_fast_loads(native: ModuleType) -> None:
    library = str(getattr(native._lib, "_name", ""))  # llama-cpp-python's loaded CDLL
    if "/llama_cpp/lib/" not in library:
        return
    for name in ("llama_model_load_from_file", "llama_load_model_from_file"):
        original = getattr(native, name, None)
        if original is None:
            continue

        def load(path: bytes, params: Any, _original: Any = original) -> Any:
            if params.use_extra_bufts:
                sys.stderr.write("simulated AMX fault: a fast-path model load dies by SIGILL\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGILL)
            return _original(path, params)

        setattr(native, name, load)


class _PatchLlamaCpp(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name != "llama_cpp.llama_cpp":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _fault_fast_loads(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _PatchLlamaCpp())
