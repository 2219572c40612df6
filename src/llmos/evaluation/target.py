"""Loading the model an evaluation measures: a registered generator, or a LoRA adapter on its base.

Contract: :func:`open_generator` yields ``(model, adapter)`` for a resolved registry version: the loaded generator
on its backend (``backend`` overrides the format's default) and ``None``, or for a LoRA adapter version its base
loaded on the PyTorch backend with the adapter added, and the adapter's key to put on each request. An embedding
model or a dataset is refused. The model is closed when the context ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from llmos.config import Settings
from llmos.errors import InvalidInputError
from llmos.registry.names import parse_ref
from llmos.registry.service import Registry, ResolvedModel
from llmos.runtime.loader import Loader
from llmos.runtime.model import LoadedModel


@contextmanager
def open_generator(
    settings: Settings,
    registry: Registry,
    resolved: ResolvedModel,
    backend: str | None = None,
    *,
    max_running: int = 4,
) -> Iterator[tuple[LoadedModel, str | None]]:
    view = resolved.view
    if view.format == "dataset":
        raise InvalidInputError(f"{view.name} is a dataset, not a model", param="model")
    adapter: str | None = None
    target = resolved
    if view.format == "lora":
        base = f"{parse_ref(str(view.details.get('base_name', ''))).repository}@{view.details.get('base_digest')}"
        target = registry.resolve(base, verify=True)
        adapter, backend = f"{view.name}@{view.digest}", "torch"
    overrides = {target.view.repository: backend} if backend else {}
    loader = Loader(settings, registry, max_running=max_running, overrides=overrides)
    instance = loader(target, loader.backend_for(target.view))
    if not isinstance(instance, LoadedModel):
        instance.close()
        raise InvalidInputError(f"{view.name} is an embedding model; evaluation needs a generator", param="model")
    try:
        if adapter is not None:
            with registry.loadable_dir(resolved) as adapter_dir:
                instance.backend.add_adapter(adapter, adapter_dir)  # type: ignore[attr-defined]
        yield instance, adapter
    finally:
        instance.close()
