"""Opening an ONNX Runtime session the way every llmos ONNX path wants it.

Contract: :func:`open_session` loads a graph on the CPU execution provider with all graph optimisations,
``threads`` intra-op threads (None: ONNX Runtime's default) and one inter-op thread. Its external data is read from
the graph's directory through read-only memory maps and handed to ONNX Runtime from memory, because a registry
version's files are symlinks into the blob store, which ONNX Runtime's own path check refuses. It raises
:class:`~llmos.errors.BackendUnavailableError` naming the extra when onnxruntime is missing, or
:class:`~llmos.errors.ModelLoadError` when ONNX Runtime refuses the graph.
"""

from __future__ import annotations

import contextlib
import mmap
from pathlib import Path
from typing import Any

from llmos.errors import BackendUnavailableError, ModelLoadError
from llmos.formats.onnx import ONNX_EXTRA, require_onnx


def graph_file(model_dir: Path) -> Path:
    """The one ``.onnx`` graph of a model directory."""
    graphs = sorted(model_dir.glob("*.onnx"))
    if len(graphs) != 1:
        raise ModelLoadError(f"{model_dir.name}: expected one .onnx graph, found {len(graphs)}")
    return graphs[0]


def open_session(graph: Path, *, threads: int | None = None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError(f"the ONNX Runtime backend needs the onnx extra: `{ONNX_EXTRA}`") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    graph_bytes = graph.read_bytes()
    with contextlib.ExitStack() as stack:
        names, buffers = [], []
        for name in external_files(graph_bytes):
            if Path(name).name != name:
                raise ModelLoadError(f"{graph.name}: external data {name!r} is not a file beside the graph")
            handle = stack.enter_context((graph.parent / name).open("rb"))
            buffers.append(stack.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)))
            names.append(name)
        if names:
            options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
        try:
            return ort.InferenceSession(graph_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception classes (Fail, InvalidGraph, ...)
            raise ModelLoadError(f"ONNX Runtime cannot load {graph.name}: {exc}") from exc


def external_files(graph_bytes: bytes) -> list[str]:
    """The external-data file names a serialized graph's initializers point into."""
    onnx = require_onnx()
    model = onnx.load_model_from_string(graph_bytes)
    found: list[str] = []
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location not in found:
                found.append(location)
    return found
