"""The one device policy of everything that runs PyTorch: the torch backend, fine-tuning and Ray training.

Contract:

* A device setting (``Settings.torch_device``, ``LLMOS_TORCH_DEVICE``) is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
  (:func:`check_device_spec` says so for the settings validator). :func:`resolve_device` turns it into a
  ``torch.device``: ``auto`` is ``cuda:0`` when ``torch.cuda.is_available()`` and ``cpu`` otherwise; ``cuda`` is
  ``cuda:0``; asking for CUDA where none is visible, or for an index past the visible devices, raises
  :class:`~llmos.errors.BackendUnavailableError`. A ``torch.device`` passes through unchanged (Ray Train hands each
  worker its own).
* A dtype setting (``Settings.torch_dtype``) is ``auto``, ``float32``, ``bfloat16`` or ``float16``;
  :func:`resolve_dtype` makes ``auto`` float32 on the CPU (exactly what llmos always ran there) and, on CUDA,
  bfloat16 where the GPU computes it natively (compute capability 8.0 and up), float16 otherwise.
* :func:`training_precision` is the ``auto`` of fine-tuning's ``precision`` setting on CUDA: bf16 where native, else
  fp32 (fp16 training would need loss scaling, which the loop does not do).
* :func:`ray_use_gpu` decides whether Ray Train workers take one GPU each: with ``auto`` when the cluster has one
  per worker, never with ``cpu``; ``cuda`` without enough GPUs is refused.
* :func:`describe_device` is what ``llmos doctor`` and ``GET /admin/runtime`` print: ``cpu`` or
  ``cuda:0 <name>, <memory> GiB``. :func:`describe_in_child` computes it in a child process (once per process,
  cached): a server that initialised CUDA itself could no longer fork model processes that use it.

torch is imported inside functions only.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from typing import Any

from llmos.errors import BackendUnavailableError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(?::\d{1,3})?")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_device_spec(spec: str) -> str:
    """``spec`` normalised (stripped, lower case) if it is a device setting; ValueError otherwise."""
    value = spec.strip().lower()
    if not DEVICE_PATTERN.fullmatch(value):
        raise ValueError(f"torch device must be auto, cpu, cuda or cuda:N, not {spec!r}")
    return value


def resolve_device(spec: Any = "auto") -> Any:
    """The ``torch.device`` a device setting means on this machine (see the module docstring)."""
    import torch

    if isinstance(spec, torch.device):
        return spec
    value = check_device_spec(str(spec or "auto"))
    if value == "cpu" or (value == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"the torch device is set to {value} but no CUDA device is visible"
            f" (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'});"
            " set LLMOS_TORCH_DEVICE=cpu or auto"
        )
    index = int(value.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise BackendUnavailableError(f"the torch device is set to {value} but only {count} CUDA device(s) are visible")
    return torch.device("cuda", index)


def bf16_native(device: Any) -> bool:
    """Whether ``device`` (CUDA) computes bfloat16 natively: compute capability 8.0 and up (Ampere), or ROCm (what
    ``torch.cuda.is_bf16_supported(including_emulation=False)`` says, for a given device; emulated bf16 is slower
    than fp16)."""
    import torch

    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(spec: str, device: Any) -> Any:
    """The ``torch.dtype`` a dtype setting means on ``device`` (see the module docstring)."""
    import torch

    if spec not in DTYPES:
        raise ValueError(f"torch dtype must be one of {', '.join(DTYPES)}, not {spec!r}")
    if spec != "auto":
        return getattr(torch, spec)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if bf16_native(device) else torch.float16


def training_precision(device: Any) -> str | None:
    """What fine-tuning's ``precision=auto`` means on ``device``: ``bf16`` or ``fp32`` on CUDA; None elsewhere (the
    caller's CPU rule applies)."""
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return None
    return "bf16" if bf16_native(device) else "fp32"


def ray_use_gpu(spec: str, cluster_gpus: float, workers: int) -> bool:
    """Whether each of ``workers`` Ray Train workers takes a GPU on a cluster with ``cluster_gpus`` of them."""
    value = check_device_spec(spec)
    if value == "cpu":
        return False
    enough = cluster_gpus >= workers
    if value != "auto" and not enough:
        raise BackendUnavailableError(
            f"the torch device is set to {value} but the Ray cluster has {cluster_gpus:g} GPU(s) for {workers} workers"
        )
    return enough


def describe_device(device: Any) -> str:
    """``cpu``, or ``cuda:N <name>, <memory> GiB``."""
    import torch

    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else 0
    properties = torch.cuda.get_device_properties(index)
    return f"cuda:{index} {properties.name}, {properties.total_memory / 1024**3:.0f} GiB"


_CHILD = """
import json, sys
from llmos.engine.torch_device import describe_device, resolve_device
try:
    print(json.dumps({"device": describe_device(resolve_device(sys.argv[1]))}))
except Exception as exc:
    print(json.dumps({"error": str(exc)}))
"""


@functools.lru_cache(maxsize=8)
def describe_in_child(spec: str, timeout: float = 60.0) -> str:
    """:func:`describe_device` of the device ``spec`` selects, computed in a child process (cached per ``spec``);
    ``unavailable: <why>`` when the setting cannot be met or the child fails."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, spec], capture_output=True, text=True, timeout=timeout, check=False
        )
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return f"unavailable: {exc}"
    return str(answer["device"]) if "device" in answer else f"unavailable: {answer.get('error')}"
