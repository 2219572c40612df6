"""Deriving a model: the one registry operation that makes a child version out of registered parents.

Every command that makes a model from another (quantize, convert both ways, LoRA merge, prune, distill, train,
fine-tune, the pipeline's quantized candidate) registers its child here, so ownership, encryption and lineage are
decided in one place.

Contract:

* :func:`derive` runs ``work(scratch)`` with a private scratch directory (0700 under ``<home>/tmp``, removed afterwards
  whatever happens and by the next start after a crash; see :mod:`llmos.store.scratch`) and registers what ``work``
  returns (the file or directory it wrote, or an inspected :class:`~llmos.formats.info.ModelInfo`) as a version of
  ``target``. ``work`` reads encrypted parents only through :meth:`Registry.loadable_dir` (a private plaintext copy,
  removed on exit) or in memory: no blob is ever linked into the scratch directory, and no plaintext stays on disk.
* :func:`register_derived` registers a child already written elsewhere (a job's output) under the same rules.
* Ownership follows the parents: the child belongs to the tenant that owns any of its parents (the parents' owner
  wins over the caller's ``tenant_id``, so deriving under a new name never makes a tenant's model public or another
  tenant's); parents owned by two different tenants are refused (:class:`~llmos.errors.ConflictError`) before any
  work; with public parents only, the child belongs to ``tenant_id`` (the caller's; None = public). A target model
  of another owner is refused by :meth:`Registry.add_version`.
* Encryption follows the parents: the child's blobs are encrypted when any parent's blob is, when ``encrypt`` asks,
  or when the registry's own rule does (:data:`~llmos.registry.service.ENCRYPTED_OPERATIONS`, adapters, datasets).
* Lineage: one record per entry of ``lineage`` (default: the parents), each with ``operation`` and ``params``; a
  LoRA adapter child is bound to its ``base``, which is recorded first. Parents named only in ``lineage`` (datasets)
  count for ownership and encryption too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.errors import ConflictError, InvalidInputError, ModelNotFoundError
from llmos.formats.detect import inspect_path
from llmos.formats.info import ModelInfo
from llmos.registry.names import parse_ref
from llmos.registry.service import ParentRef, ProgressFactory, Registry, ResolvedModel
from llmos.registry.views import VersionView
from llmos.store.scratch import private_dir

Parent = ResolvedModel | VersionView
Work = Callable[[Path], Path | ModelInfo]
"""Writes the child into the scratch directory it is given; returns its file or directory (or its inspected info)."""


@dataclass(frozen=True)
class ChildPolicy:
    """Who owns a derived child and whether its blobs are encrypted."""

    tenant_id: int | None
    encrypt: bool


def _view(parent: Parent) -> VersionView:
    return parent.view if isinstance(parent, ResolvedModel) else parent


def _lineage_view(registry: Registry, ref: ParentRef) -> VersionView | None:
    try:
        return registry.show(f"{parse_ref(ref.name).repository}@{ref.digest}")
    except (ModelNotFoundError, InvalidInputError):
        return None  # removed since (or a name that is not one): nothing left to inherit


def child_policy(
    registry: Registry,
    parents: Sequence[Parent],
    *,
    lineage: Sequence[ParentRef] = (),
    tenant_id: int | None = None,
    encrypt: bool = False,
) -> ChildPolicy:
    """The owner and encryption of a child of ``parents`` (and of the versions ``lineage`` names), made for a caller
    of ``tenant_id``; see the module docstring."""
    views = [_view(p) for p in parents]
    known = {(v.repository, v.digest) for v in views}
    for ref in lineage:
        found = _lineage_view(registry, ref)
        if found is not None and (found.repository, found.digest) not in known:
            views.append(found)
            known.add((found.repository, found.digest))
    owners = {v.tenant_id for v in views if v.tenant_id is not None}
    if len(owners) > 1:
        names = ", ".join(sorted(v.name for v in views if v.tenant_id is not None))
        raise ConflictError(f"the parents ({names}) belong to different tenants; a child cannot belong to both")
    owner = next(iter(owners)) if owners else tenant_id
    encrypted = encrypt or any(registry.blobs.is_encrypted(f.digest) for v in views for f in v.files)
    return ChildPolicy(owner, encrypted)


def derive(
    registry: Registry,
    parents: Sequence[Parent],
    work: Work,
    target: str,
    *,
    operation: str,
    params: dict[str, Any] | None = None,
    lineage: Sequence[ParentRef] | None = None,
    tenant_id: int | None = None,
    encrypt: bool = False,
    chat_template: str | None = None,
    base: str | None = None,
    progress: ProgressFactory | None = None,
    prefix: str = "derive-",
) -> VersionView:
    """Make a child of ``parents`` with ``work`` in a private scratch directory and register it as ``target``.

    ``chat_template`` (when given) replaces the template the child's files carry; ``base`` binds a LoRA adapter
    child to its base model. Returns the child's view.
    """
    parse_ref(target)  # a bad name, or parents of two tenants, are refused before any work
    child_policy(registry, parents, lineage=lineage or (), tenant_id=tenant_id, encrypt=encrypt)
    with private_dir(registry.scratch_dir, prefix) as scratch:
        made = work(scratch)
        return register_derived(
            registry,
            parents,
            made,
            target,
            operation=operation,
            params=params,
            lineage=lineage,
            tenant_id=tenant_id,
            encrypt=encrypt,
            chat_template=chat_template,
            base=base,
            progress=progress,
        )


def register_derived(
    registry: Registry,
    parents: Sequence[Parent],
    output: Path | ModelInfo,
    target: str,
    *,
    operation: str,
    params: dict[str, Any] | None = None,
    lineage: Sequence[ParentRef] | None = None,
    tenant_id: int | None = None,
    encrypt: bool = False,
    chat_template: str | None = None,
    base: str | None = None,
    progress: ProgressFactory | None = None,
) -> VersionView:
    """Register a child already written at ``output`` (a job's result) under the rules of :func:`derive`."""
    parse_ref(target)
    info = output if isinstance(output, ModelInfo) else inspect_path(output)
    refs = list(lineage) if lineage is not None else [ParentRef(_view(p).digest, _view(p).name) for p in parents]
    if info.format == "lora":
        bound = registry.bind_adapter(info, base)  # the base is a parent too: it counts for the policy
        refs = [bound, *(r for r in refs if r.digest != bound.digest)]
    elif base is not None:
        raise InvalidInputError("base applies only to LoRA adapters", param="base")
    policy = child_policy(registry, parents, lineage=refs, tenant_id=tenant_id, encrypt=encrypt)
    if chat_template:
        info.chat_template = chat_template
    return registry.import_info(
        info,
        target,
        progress=progress,
        operation=operation,
        parents=refs,
        params=params,
        tenant_id=policy.tenant_id,
        encrypt=policy.encrypt,
    )
