"""Inspect an ONNX model: one ``.onnx`` graph, its external-data files and the Hugging Face side files around it.

Contract: :func:`inspect_onnx` accepts a ``.onnx`` file or a directory holding exactly one, and returns a
:class:`~llmos.formats.info.ModelInfo` with ``format="onnx"`` and the facts read from the graph without loading its
weights: opset, inputs and outputs, parameter count (from the initializers' shapes), the task (``generation`` for a
decoder with ``logits``, ``embedding`` for an encoder with ``sentence_embedding`` or ``last_hidden_state``) and, for
a decoder, the KV-cache shape. Every external-data file must lie inside the graph's directory (no absolute path, no
``..``, no symlink) and be large enough for the tensors that point into it; each is recorded with its SHA-256.
Refused with :class:`~llmos.errors.InvalidModelFileError`: a truncated or malformed graph, an external-data path that
escapes the directory, a missing or short data file, inputs other than the ones the ONNX backend feeds
(:data:`SUPPORTED_INPUTS`, plus ``past_key_values.N.key/value``). Needs the ``onnx`` package (``llmos[onnx]``);
nothing here runs the graph.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmos.edge.runner import sha256_file
from llmos.errors import BackendUnavailableError, InvalidModelFileError
from llmos.formats import safe_json
from llmos.formats.info import ModelFile, ModelInfo

SUPPORTED_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
EMBEDDING_OUTPUTS = ("sentence_embedding", "last_hidden_state")
ONNX_EXTRA = "pip install 'llmos[onnx]'"
_MAX_JSON_BYTES = 32 * 1024 * 1024


def require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise BackendUnavailableError(f"ONNX models need the onnx extra: `{ONNX_EXTRA}`") from exc
    return onnx


def inspect_onnx(path: Path) -> ModelInfo:
    """Inspect ``path`` (a ``.onnx`` file or a directory with one) without loading its weights."""
    from llmos.formats.detect import HF_SIDE_FILES, MODULE_DIR, PICKLE_SUFFIXES, unsafe_file

    if path.is_dir():
        graphs = sorted(p for p in path.iterdir() if p.suffix == ".onnx" and p.is_file() and not p.is_symlink())
        if len(graphs) != 1:
            raise InvalidModelFileError(f"{path}: expected exactly one .onnx graph, found {len(graphs)}")
        graph_file, directory = graphs[0], path
    else:
        graph_file, directory = path, path.parent
    onnx = require_onnx()
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(graph_file), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise InvalidModelFileError(
            f"{graph_file.name}: not a readable ONNX graph (truncated or corrupt): {exc}"
        ) from exc
    graph = model.graph
    if not graph.node or not graph.output:
        raise InvalidModelFileError(f"{graph_file.name}: not a readable ONNX graph (no nodes or no outputs)")

    files = [ModelFile(graph_file, graph_file.name, graph_file.stat().st_size)]
    external = _external_data(model, directory, graph_file.name)
    if path.is_dir():  # raw tensor bytes the graph points into are data, whatever their suffix; other pickles are not
        pickles = [p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.name not in external]
        if pickles:
            raise unsafe_file(pickles[0])
    digests: dict[str, str] = {}
    for name in sorted(external):
        source = directory / name
        digests[name] = sha256_file(source)
        files.append(ModelFile(source, name, source.stat().st_size))
    if path.is_dir():
        for side in sorted(p for p in path.iterdir() if p.name in HF_SIDE_FILES and p.is_file()):
            if not side.is_symlink():
                files.append(ModelFile(side, side.name, side.stat().st_size))
        for module in sorted(p for p in path.iterdir() if p.is_dir() and MODULE_DIR.match(p.name)):
            settings = module / "config.json"  # sentence-transformers pooling settings, for last_hidden_state graphs
            if settings.is_file() and not settings.is_symlink():
                _side_json(settings)
                files.append(ModelFile(settings, f"{module.name}/config.json", settings.stat().st_size))

    inputs = {i.name: _shape(i) for i in graph.input}
    outputs = {o.name: _shape(o) for o in graph.output}
    initializer_names = {t.name for t in graph.initializer}
    unsupported = [n for n in inputs if n not in SUPPORTED_INPUTS and not PAST.match(n) and n not in initializer_names]
    if unsupported or "input_ids" not in inputs:
        what = f"unsupported inputs {', '.join(unsupported)}" if unsupported else "no input_ids input"
        raise InvalidModelFileError(
            f"{graph_file.name}: {what}; the ONNX backend feeds {', '.join(SUPPORTED_INPUTS)} and"
            " past_key_values.N.key/value"
        )
    metadata: dict[str, Any] = {
        "opset": next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": inputs,
        "outputs": outputs,
        "graph": graph_file.name,
        "external_data": digests,
        "producer": model.producer_name or None,
    }
    if "logits" in outputs:
        metadata["task"] = "generation"
        metadata.update(_decoder_shape(inputs, graph_file.name))
    elif any(name in outputs for name in EMBEDDING_OUTPUTS):
        metadata["task"] = "embedding"
    else:
        raise InvalidModelFileError(
            f"{graph_file.name}: outputs {', '.join(outputs)}; expected logits (a decoder) or"
            f" {' or '.join(EMBEDDING_OUTPUTS)} (an encoder)"
        )
    config = _side_json(directory / "config.json") if path.is_dir() else {}
    tokenizer_config = _side_json(directory / "tokenizer_config.json") if path.is_dir() else {}
    template = tokenizer_config.get("chat_template")
    if path.is_dir() and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    architectures = config.get("architectures")
    context = config.get("max_position_embeddings")
    dtypes = {t.data_type for t in graph.initializer}
    quantized = any(node.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul") for node in graph.node)
    return ModelInfo(
        format="onnx",
        files=files,
        architecture=str(architectures[0]) if isinstance(architectures, list) and architectures else None,
        parameter_count=sum(_count(t.dims) for t in graph.initializer),
        quantization="int8" if quantized else ("F32" if dtypes <= {1, 6, 7} else None),
        context_length=context if isinstance(context, int) and context > 0 else None,
        chat_template=template if isinstance(template, str) else None,
        tokenizer={"vocab_size": config.get("vocab_size")},
        metadata=metadata,
    )


def _external_data(model: Any, directory: Path, graph_name: str) -> set[str]:
    """The data files the initializers point into, each checked to lie inside ``directory`` and be long enough."""
    needed: dict[str, int] = {}
    root = directory.resolve()
    for tensor in model.graph.initializer:
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        relative = Path(location)
        target = (directory / relative).resolve()
        if (
            not location
            or relative.is_absolute()
            or ".." in relative.parts
            or target.parent != root
            or (directory / relative).is_symlink()
        ):
            raise InvalidModelFileError(
                f"{graph_name}: tensor {tensor.name!r} keeps its data at {location!r}, outside the graph's directory"
            )
        if not target.is_file():
            raise InvalidModelFileError(f"{graph_name}: external data file {location!r} is missing")
        try:
            end = int(entries.get("offset", "0")) + int(entries.get("length", str(_nbytes(tensor))))
        except ValueError as exc:
            raise InvalidModelFileError(f"{graph_name}: tensor {tensor.name!r} has a bad offset or length") from exc
        needed[relative.name] = max(needed.get(relative.name, 0), end)
    for name, end in needed.items():
        if (directory / name).stat().st_size < end:
            raise InvalidModelFileError(f"{graph_name}: external data file {name!r} is shorter than its tensors need")
    return set(needed)


_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def _nbytes(tensor: Any) -> int:
    return _count(tensor.dims) * _ELEMENT_BYTES.get(int(tensor.data_type), 4)


def _count(dims: Any) -> int:
    total = 1
    for dim in dims:
        total *= int(dim)
    return total


def _shape(value: Any) -> list[int | str]:
    """A graph input or output's shape: fixed sizes as ints, symbolic ones by name (``?`` when unnamed)."""
    dims = value.type.tensor_type.shape.dim
    return [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _decoder_shape(inputs: dict[str, list[int | str]], graph_name: str) -> dict[str, Any]:
    layers = sorted({int(m.group(1)) for name in inputs if (m := PAST.match(name))})
    if not layers:
        raise InvalidModelFileError(
            f"{graph_name}: a decoder without past_key_values inputs; the ONNX backend needs a graph with a KV cache"
        )
    if layers != list(range(len(layers))) or not all(
        f"past_key_values.{i}.{kind}" in inputs for i in layers for kind in ("key", "value")
    ):
        raise InvalidModelFileError(f"{graph_name}: past_key_values inputs are not numbered 0..N-1 in key/value pairs")
    if not {"attention_mask", "position_ids"} <= set(inputs):
        raise InvalidModelFileError(f"{graph_name}: a decoder needs attention_mask and position_ids inputs")
    shape = inputs["past_key_values.0.key"]
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise InvalidModelFileError(f"{graph_name}: past_key_values must be [batch, kv_heads, past, head_dim]")
    return {"shape": {"layers": len(layers), "kv_heads": shape[1], "head_dim": shape[3]}}


def _side_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = safe_json.read(path, _MAX_JSON_BYTES)
    return value if isinstance(value, dict) else {}


def sentence_pooling(directory: Path) -> tuple[str, bool]:
    """A sentence-transformers directory's pooling (``max_tokens``, ``mean_sqrt_len_tokens``, ``cls_token`` or, by
    default, ``mean_tokens``, from ``1_Pooling/config.json``) and whether a Normalize step follows
    (``modules.json``)."""
    pooling = _side_json(directory / "1_Pooling" / "config.json")
    modes = ("max_tokens", "mean_sqrt_len_tokens", "cls_token")
    mode = next((m for m in modes if pooling.get(f"pooling_mode_{m}")), "mean_tokens")
    modules_file = directory / "modules.json"
    modules = safe_json.read(modules_file, _MAX_JSON_BYTES) if modules_file.is_file() else []
    steps = modules if isinstance(modules, list) else []
    return mode, any(isinstance(m, dict) and str(m.get("type", "")).endswith("Normalize") for m in steps)
