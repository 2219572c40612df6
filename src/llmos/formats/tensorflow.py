"""Hugging Face TensorFlow checkpoints (``config.json`` + ``tf_model.h5``): recognise them, convert them to safetensors.

Contract:

* :func:`find_tf_checkpoint` returns the ``tf_model.h5`` of a directory that holds one and no safetensors or ONNX
  weights and is no LoRA adapter (those directories are imported as before), and None for anything else. A
  directory holding pickle checkpoints is left to :func:`llmos.formats.detect.inspect_path`, which refuses it. TF forms
  this module cannot read are refused with :class:`~llmos.errors.InvalidModelFileError`: Keras 3 ``.keras`` archives,
  SavedModels (``saved_model.pb``), sharded ``tf_model-*.h5`` checkpoints and a bare ``.h5`` file without its
  directory.
* :func:`tf_to_hf` converts such a directory into a Hugging Face safetensors directory and returns the lineage params
  (``converted_from``, ``tf_model_sha256``). TensorFlow itself is never imported (transformers 5 has no TF models):
  the HDF5 weights are read with h5py as plain arrays, nothing in the file is executed, and HDF5 links, external or
  virtual storage, filters (compression) and non-numeric datasets are refused, so the file can give only its own
  bytes and no more arrays than its size holds. TF weight names map to PyTorch names as transformers 4.x did
  (:func:`tf_to_pt_name`); the PyTorch class is the config's architecture without its ``TF`` prefix. Loading is
  strict: a weight no parameter takes, a parameter no weight gives, or a shape that differs after the transpose
  raises :class:`~llmos.errors.InvalidModelFileError` in one line. The output is ``save_pretrained`` (safetensors)
  plus the allow-listed tokenizer side files (:data:`~llmos.formats.detect.HF_SIDE_FILES`).
* Needs h5py (``llmos[tensorflow]``) and torch + transformers (``llmos[torch]``); without them
  :class:`~llmos.errors.BackendUnavailableError` names the extras.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.edge.runner import sha256_file
from llmos.errors import BackendUnavailableError, InvalidModelFileError
from llmos.formats import safe_json
from llmos.formats.detect import HF_SIDE_FILES, MAX_JSON_BYTES, PICKLE_SUFFIXES

if TYPE_CHECKING:  # numpy loads only when a TensorFlow checkpoint is read (the registry imports this module)
    import numpy as np

TF_WEIGHTS = "tf_model.h5"
TOP_LEVEL_GROUP = "top_level_model_weights"
"""Where Keras 2 keeps weights that belong to the model itself rather than to one of its layers."""
MAX_NAMES = 1_000_000
_SIDE_FILES = HF_SIDE_FILES - {"model.safetensors.index.json"}  # save_pretrained writes config and index itself
_NEEDS = "converting a TensorFlow checkpoint needs h5py, torch and transformers: pip install 'llmos[tensorflow,torch]'"
KERNEL_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}
"""TF kernel layout -> PyTorch: dense (in, out) -> (out, in); conv1d (k, in, out) and conv2d (k0, k1, in, out) ->
(out, in, k...)."""
_SHARD = re.compile(r"^tf_model-\d+-of-\d+\.h5$")


def _unsupported(name: str, what: str) -> InvalidModelFileError:
    return InvalidModelFileError(
        f"{name}: {what} is not supported; only Hugging Face TensorFlow checkpoints saved as tf_model.h5 (next to"
        " config.json) are imported"
    )


def find_tf_checkpoint(path: Path) -> Path | None:
    """The ``tf_model.h5`` to convert when ``path`` is a TensorFlow checkpoint directory; None when it is not one."""
    if path.is_file():
        lower = path.name.lower()
        if lower.endswith(".keras"):
            raise _unsupported(path.name, "a Keras 3 .keras archive")
        if lower == "saved_model.pb":
            raise _unsupported(path.name, "a TensorFlow SavedModel")
        if lower.endswith((".h5", ".hdf5")):
            raise InvalidModelFileError(
                f"{path.name}: import the Hugging Face directory that holds it (with its config.json), not the file"
            )
        return None
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir() if p.is_file() and not p.is_symlink()}
    if "adapter_config.json" in names or any(n.endswith((".safetensors", ".onnx")) for n in names):
        return None  # a LoRA adapter, safetensors or ONNX directory: inspect_path takes it as before
    if any(Path(n).suffix.lower() in PICKLE_SUFFIXES for n in names):
        return None  # pickles next to the TF weights: inspect_path refuses the directory, as before
    if TF_WEIGHTS in names:
        return path / TF_WEIGHTS
    if "tf_model.h5.index.json" in names or any(_SHARD.match(n) for n in names):
        raise _unsupported(path.name, "a sharded TensorFlow checkpoint (tf_model-*-of-*.h5)")
    if keras := sorted(n for n in names if n.lower().endswith(".keras")):
        raise _unsupported(keras[0], "a Keras 3 .keras archive")
    if "saved_model.pb" in names:
        raise _unsupported(path.name, "a TensorFlow SavedModel (saved_model.pb)")
    return None


def tf_to_pt_name(tf_name: str, prefix_to_remove: str = "", ndim: int = 2) -> tuple[str, tuple[int, ...] | None]:
    """The PyTorch name of a TF weight and the axes to transpose it by (None: as it is), as transformers 4.x did.

    ``tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0`` -> ``bert.encoder.layer.0.attention.self.
    query.weight``, transposed: ``:0`` goes, ``a___b`` becomes ``b``, ``_._`` separates levels (lists), the first scope
    (the model's own name) is dropped, ``kernel`` / ``embeddings`` / ``gamma`` become ``weight`` and ``beta`` ``bias``.
    Kernels are transposed (:data:`KERNEL_AXES`; ``ndim`` is the weight's rank). Names this does not know (other
    layer types) come out unmatched, and :func:`tf_state_dict` refuses them rather than guessing.
    ``prefix_to_remove`` (``"bert."``) is dropped once when the PyTorch model is the bare base model.
    """
    name = tf_name.replace(":0", "")
    name = re.sub(r"/[^/]*___([^/]*)/", r"/\1/", name)
    name = name.replace("_._", "/")
    name = re.sub(r"//+", "/", name)
    levels = name.split("/")
    if len(levels) > 1:
        levels = levels[1:]
    last = levels[-1]
    axes: tuple[int, ...] | None = None
    if last == "kernel":
        axes = KERNEL_AXES.get(ndim)
    if last in ("kernel", "embeddings", "gamma"):
        levels[-1] = "weight"
    elif last == "beta":
        levels[-1] = "bias"
    result = ".".join(levels)
    if prefix_to_remove and result.startswith(prefix_to_remove):
        result = result[len(prefix_to_remove) :]
    return result, axes


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise BackendUnavailableError(_NEEDS) from exc
    return h5py


def _names(node: Any, key: str) -> list[str]:
    """A Keras name-list attribute (``layer_names``, ``weight_names``), also when Keras split it into key0, key1, ..."""
    if key in node.attrs:
        chunks = [node.attrs[key]]
    else:
        chunks = []
        while f"{key}{len(chunks)}" in node.attrs:
            chunks.append(node.attrs[f"{key}{len(chunks)}"])
    import numpy as np

    names: list[str] = []
    for chunk in chunks:
        for item in np.asarray(chunk).reshape(-1).tolist():
            names.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
            if len(names) > MAX_NAMES:
                raise InvalidModelFileError(f"{TF_WEIGHTS}: more than {MAX_NAMES} names in {key}")
    return names


def _member(h5py: Any, root: Any, path: str) -> Any:
    """``root[path]``, refusing soft and external links on the way (a link could pull in another file)."""
    node = root
    for part in path.split("/"):
        if not part or part in (".", ".."):
            raise InvalidModelFileError(f"{TF_WEIGHTS}: bad weight name {path!r}")
        if not isinstance(node, h5py.Group):
            raise InvalidModelFileError(f"{TF_WEIGHTS}: bad weight name {path!r}")
        link = node.get(part, getlink=True)
        if link is None:
            raise InvalidModelFileError(f"{TF_WEIGHTS}: the weight {path!r} is listed but not stored")
        if not isinstance(link, h5py.HardLink):
            raise InvalidModelFileError(f"{TF_WEIGHTS}: {path!r} is an HDF5 link to elsewhere; refused")
        node = node[part]
    return node


def read_tf_weights(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Every weight a Keras 2 HDF5 weights file lists (by its TF name), read as plain arrays; see the module doc."""
    import numpy as np

    h5py = _h5py()
    file_size = path.stat().st_size
    weights: dict[str, np.ndarray[Any, Any]] = {}
    total = 0
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise InvalidModelFileError(f"{TF_WEIGHTS}: not a readable HDF5 file ({exc})") from exc
    with handle:
        if "layer_names" not in handle.attrs:
            raise InvalidModelFileError(f"{TF_WEIGHTS}: not a Keras HDF5 weights file (no layer_names)")
        groups = _names(handle, "layer_names")
        if TOP_LEVEL_GROUP in handle and TOP_LEVEL_GROUP not in groups:
            groups.append(TOP_LEVEL_GROUP)
        for group_name in groups:
            group = _member(h5py, handle, group_name)
            for weight_name in _names(group, "weight_names"):
                if weight_name in weights:
                    continue  # a weight shared by two layers is stored once per layer
                dataset = _member(h5py, group, weight_name)
                if not isinstance(dataset, h5py.Dataset):
                    raise InvalidModelFileError(f"{TF_WEIGHTS}: {weight_name!r} is not an array")
                if dataset.dtype.kind not in "fiu":
                    raise InvalidModelFileError(f"{TF_WEIGHTS}: {weight_name!r} has non-numeric type {dataset.dtype}")
                if dataset.is_virtual or dataset.external or dataset.id.get_create_plist().get_nfilters():
                    raise InvalidModelFileError(
                        f"{TF_WEIGHTS}: {weight_name!r} uses virtual, external or filtered (compressed) storage"
                    )
                total += int(dataset.size) * dataset.dtype.itemsize
                if total > file_size:
                    raise InvalidModelFileError(f"{TF_WEIGHTS}: its arrays are larger than the file itself")
                weights[weight_name] = np.asarray(dataset[()], dtype=dataset.dtype.newbyteorder("="))
    if not weights:
        raise InvalidModelFileError(f"{TF_WEIGHTS}: no weights listed")
    return weights


def _model_class(config: dict[str, Any], transformers: Any) -> tuple[Any, Any]:
    """The PyTorch model class for a TF checkpoint's config (architecture without ``TF``) and its config object."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise InvalidModelFileError(f"config.json: unknown model_type {model_type!r} for transformers")
    if config.get("auto_map"):
        raise InvalidModelFileError("config.json: models with custom code (auto_map) are not converted")
    hf_config = transformers.CONFIG_MAPPING[model_type].from_dict(config)
    architectures = config.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    if name is None:  # no architecture recorded: the base model of this model type
        try:
            return transformers.MODEL_MAPPING[type(hf_config)], hf_config
        except KeyError as exc:
            raise InvalidModelFileError(f"config.json: no PyTorch model for model_type {model_type!r}") from exc
    if not isinstance(name, str):
        raise InvalidModelFileError(f"config.json: bad architecture {name!r}")
    pt_name = name[2:] if re.match(r"^TF[A-Z]", name) else name
    cls = getattr(transformers, pt_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise InvalidModelFileError(f"config.json: {name} has no PyTorch model class in transformers")
    if not isinstance(hf_config, getattr(cls, "config_class", type(hf_config))):
        raise InvalidModelFileError(f"config.json: {name} does not take a {type(hf_config).__name__}")
    return cls, hf_config


def _short(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def tf_state_dict(model: Any, tf_weights: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
    """The state dict for ``model`` from TF weights: every weight used, every parameter given, shapes equal."""
    import numpy as np
    import torch

    parameters = dict(model.named_parameters())  # a tied parameter appears once, as in TF
    persistent = {name for name, _ in model.named_buffers() if name in model.state_dict()}
    prefix = model.base_model_prefix
    prefix_to_remove = f"{prefix}." if prefix and not any(n.startswith(f"{prefix}.") for n in parameters) else ""
    state: dict[str, Any] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for tf_name, array in tf_weights.items():
        pt_name, axes = tf_to_pt_name(tf_name, prefix_to_remove, array.ndim)
        target = parameters.get(pt_name)
        if target is None and pt_name in persistent:
            target = model.get_buffer(pt_name)
        if target is None:
            unexpected.append(tf_name)
            continue
        value = np.ascontiguousarray(np.transpose(array, axes) if axes else array)
        if tuple(value.shape) != tuple(target.shape):
            mismatched.append(f"{tf_name} {tuple(value.shape)} vs {pt_name} {tuple(target.shape)}")
            continue
        if pt_name in state:
            unexpected.append(f"{tf_name} (a second weight for {pt_name})")
            continue
        state[pt_name] = torch.from_numpy(value)
    missing = sorted(set(parameters) - set(state))
    if unexpected or missing or mismatched:
        problems = [
            f"{len(unexpected)} weight(s) no parameter takes: {_short(unexpected)}" if unexpected else "",
            f"{len(missing)} parameter(s) no weight gives: {_short(missing)}" if missing else "",
            f"{len(mismatched)} shape mismatch(es): {_short(mismatched)}" if mismatched else "",
        ]
        raise InvalidModelFileError(
            f"{TF_WEIGHTS} does not fit {type(model).__name__}: " + "; ".join(p for p in problems if p)
        )
    return state


def tf_to_hf(directory: Path, out_dir: Path) -> dict[str, Any]:
    """Convert the TF checkpoint in ``directory`` into a safetensors Hugging Face directory ``out_dir``.

    Returns the params that record the conversion in the new version's lineage.
    """
    h5_path = directory / TF_WEIGHTS
    config_path = directory / "config.json"
    config = safe_json.read(config_path, MAX_JSON_BYTES) if config_path.is_file() else None
    if not isinstance(config, dict):
        raise InvalidModelFileError(f"{directory}: a TensorFlow checkpoint needs its config.json (a JSON object)")
    _h5py()
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on installation
        raise BackendUnavailableError(_NEEDS) from exc
    from transformers.utils import logging as hf_logging

    tf_weights = read_tf_weights(h5_path)
    cls, hf_config = _model_class(config, transformers)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model = cls(hf_config)
        model = model.to(torch.float32).eval()
        with torch.no_grad():
            model.load_state_dict(tf_state_dict(model, tf_weights), strict=False)
        del tf_weights
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        detail = " ".join(str(exc).split())[:500]  # one line, whatever transformers says
        raise InvalidModelFileError(f"transformers cannot build this TensorFlow checkpoint's model: {detail}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    if not any(out_dir.glob("*.safetensors")):  # pragma: no cover - transformers writes safetensors by default
        raise InvalidModelFileError("the converted model was not written as safetensors")
    for side in sorted(directory.iterdir()):
        target = out_dir / side.name
        if side.name in _SIDE_FILES and side.is_file() and not side.is_symlink() and not target.exists():
            shutil.copyfile(side, target)
    return {"converted_from": "tensorflow", "tf_model_sha256": sha256_file(h5_path)}
