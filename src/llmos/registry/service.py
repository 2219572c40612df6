"""The model registry: names, versions, tags and lineage over the blob store.

Contract:

* Every mutation validates its input completely (name grammar, file format and sizes) before it changes anything.
* Bytes first, rows second: blobs are written (atomically, see :mod:`llmos.store.blobs`) while the store lock is
  held shared, then one database transaction creates the model, version, files, lineage and tag together. A crash
  between the two leaves only unreferenced blobs, which :meth:`Registry.maintain` removes at the next start.
* A version is immutable and identified by the sha256 of its canonical manifest (format, files with their digests
  and sizes, and the model facts read from the file). Tags are movable names for versions of the same model.
* A blob is deleted only when no version references it any more.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError as UniqueViolation
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, selectinload

from llmos.config import Settings
from llmos.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    InvalidModelFileError,
    ModelNotFoundError,
    ModelUnavailableError,
    StorageError,
)
from llmos.formats.detect import inspect_path
from llmos.formats.info import ModelInfo
from llmos.formats.tensorflow import find_tf_checkpoint, tf_to_hf
from llmos.registry.names import DEFAULT_TAG, ModelRef, parse_ref
from llmos.registry.views import VersionView, canonical_json, version_view
from llmos.store.blobs import BlobInfo, BlobStore, ProgressCallback
from llmos.store.crypto import BlobCipher, derive_key
from llmos.store.db import open_database, session_factory
from llmos.store.schema import Lineage, Model, ModelVersion, Tag, TagHistory, VersionFile, utcnow
from llmos.store.scratch import clean_private, private_dir

MANIFEST_SCHEMA = "llmos.model.v1"
ENCRYPTED_OPERATIONS = {"fine-tune", "train", "distill"}
"""Versions made from private data are encrypted at rest when a key is configured (and LoRA adapters always)."""
# Called once with the total byte count, then the store reports progress through the returned callback.
ProgressFactory = Callable[[str, int], ProgressCallback]


HISTORY_PER_TAG = 10
"""Moves of one tag that are remembered (and, for tags other than ``latest``, whose versions are kept for rollback)."""


@dataclass(frozen=True)
class ParentRef:
    """A parent of a new version, for lineage."""

    digest: str
    name: str


@dataclass
class RemoveResult:
    removed_tags: list[str] = field(default_factory=list)
    removed_versions: list[str] = field(default_factory=list)
    deleted_blobs: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    bad_manifests: list[str] = field(default_factory=list)
    affected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.bad_manifests)


@dataclass(frozen=True)
class ResolvedModel:
    """A version ready to load: its view plus where each of its files lies in the blob store."""

    view: VersionView
    paths: dict[str, Path]

    @property
    def primary_path(self) -> Path:
        """The weights file of a single-file model (GGUF / safetensors)."""
        if len(self.paths) == 1:
            return next(iter(self.paths.values()))
        raise InvalidModelFileError(f"{self.view.name} has several files; load it as a directory")

    def materialize(self, root: Path) -> Path:
        """A directory under ``root`` where the version's files appear under their own names (symlinks to blobs).

        Built in a temporary directory and renamed into place, so a half-built directory is never used; libraries
        that expect a Hugging Face layout load from it. Deleting a blob leaves a dangling link, never stale bytes.
        """
        target = root / self.view.digest.split(":", 1)[1]
        if target.is_dir():
            return target
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="materialize-", dir=root))
        for relative, blob in self.paths.items():
            link = staging / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(blob, link)
        try:
            os.rename(staging, target)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
        return target


def _cipher(settings: Settings) -> BlobCipher | None:
    """The blob cipher for this home, if an encryption key is configured (the salt is created once per home)."""
    secret = settings.encryption_key.get_secret_value() if settings.encryption_key else None
    if secret is None and settings.encryption_key_file is not None:
        try:
            secret = settings.encryption_key_file.read_text().strip()
        except OSError as exc:
            raise StorageError(f"cannot read the encryption key file: {exc.strerror}") from exc
    if not secret:
        return None
    salt_path = settings.home / "encryption.salt"
    if not salt_path.exists():
        salt_path.write_bytes(os.urandom(16))
    return BlobCipher(derive_key(secret, salt_path.read_bytes()))


class Registry:
    """The model registry of one llmos home. Cheap to construct; safe to use from several processes at once."""

    def __init__(self, settings: Settings, *, maintain: bool = True) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(settings.blobs_dir, lock_path=settings.home / "store.lock", cipher=_cipher(settings))
        self.engine: Engine = open_database(
            settings.effective_database_url(), settings.home, settings.db_busy_timeout_ms
        )
        self._sessions = session_factory(self.engine)
        self.blob_fetcher: Callable[[BlobStore, str], bool] | None = None
        """Set by a front end that shares its database with others: fetches a blob this store lacks from a peer
        (:meth:`llmos.registry.peers.FrontEnds.fetch_blob`)."""
        if maintain:
            self.maintain()

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self._sessions()

    # --- maintenance ------------------------------------------------------------------------------------------------

    def referenced_blobs(self, session: Session) -> set[str]:
        return set(session.scalars(select(VersionFile.blob_digest).distinct()))

    def maintain(self, wait_s: float = 0.0) -> tuple[int, int]:
        """Remove temp files of interrupted writes and blobs no version references (crash leftovers).

        Private scratch directories left by a killed process (decrypted weights, a half-made child) go first,
        whatever else runs: their locks say which are abandoned. The rest is skipped (returns ``(0, 0)``) while
        another process is writing. Returns (temp files, blobs) removed.
        """
        clean_private(self.scratch_dir)
        with self.blobs.maintenance(wait_s) as acquired:
            if not acquired:
                return 0, 0
            tmp_removed = self.blobs.clean_tmp()
            with self.session() as session:
                referenced = self.referenced_blobs(session)
                versions = {d.split(":", 1)[1] for d in session.scalars(select(ModelVersion.digest).distinct())}
            orphans = [d for d in self.blobs.iter_digests() if d not in referenced]
            for digest in orphans:
                self.blobs.delete(digest)
            if self.materialized_dir.is_dir():
                for entry in self.materialized_dir.iterdir():
                    if entry.name not in versions:
                        shutil.rmtree(entry, ignore_errors=True)
            return tmp_removed, len(orphans)

    @property
    def materialized_dir(self) -> Path:
        """Where multi-file versions are laid out under their own file names (see ResolvedModel.materialize)."""
        return self.settings.home / "models"

    @property
    def scratch_dir(self) -> Path:
        """Where private temporary directories (decrypted parents, children being derived) are made."""
        return self.settings.home / "tmp"

    def model_dir(self, resolved: ResolvedModel) -> Path:
        return resolved.materialize(self.materialized_dir)

    @contextlib.contextmanager
    def loadable_dir(self, resolved: ResolvedModel) -> Iterator[Path]:
        """A directory with the version's files under their own names, for the time it takes to load them.

        Plaintext versions use their materialised directory of links. Encrypted versions are decrypted into a
        private (0700) temporary directory under :attr:`scratch_dir` that is removed on exit (and by the next start
        after a crash, see :mod:`llmos.store.scratch`), so plaintext never stays on disk.
        """
        if not any(self.blobs.is_encrypted(f.digest) for f in resolved.view.files):
            yield self.model_dir(resolved)
            return
        with private_dir(self.scratch_dir, "decrypted-") as private:
            for file in resolved.view.files:
                target = private / file.path
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    for chunk in self.blobs.read_chunks(file.digest):
                        out.write(chunk)
            yield private

    # --- writing ----------------------------------------------------------------------------------------------------

    def import_path(
        self,
        source: Path,
        name: str,
        *,
        progress: ProgressFactory | None = None,
        params: dict[str, Any] | None = None,
        base: str | None = None,
        operation: str = "import",
        tenant_id: int | None = None,
        parents: Sequence[ParentRef] = (),
        chat_template: str | None = None,
    ) -> VersionView:
        """Import a GGUF file, a safetensors file, a Hugging Face directory or a peft LoRA directory under ``name``
        (``chat_template`` replaces the model's own).

        A LoRA adapter must name its ``base`` (a registered Hugging Face model of the same architecture). ``parents``
        adds lineage beyond the base (e.g. the dataset a model was trained on). A Hugging Face TensorFlow checkpoint
        (``tf_model.h5``) is converted to safetensors in a private scratch directory first, and that is registered,
        with the conversion in its lineage params (:mod:`llmos.formats.tensorflow`).
        """
        parse_ref(name)  # a bad name is refused before the file is even opened
        if find_tf_checkpoint(source) is not None:
            with private_dir(self.scratch_dir, "tensorflow-") as scratch:
                converted = tf_to_hf(source, scratch / "hf")
                return self.import_path(
                    scratch / "hf",
                    name,
                    progress=progress,
                    params={"source": source.name, **converted, **(params or {})},
                    base=base,
                    operation=operation,
                    tenant_id=tenant_id,
                    parents=parents,
                    chat_template=chat_template,
                )
        info = inspect_path(source)
        if chat_template is not None:
            info.chat_template = chat_template
        all_parents: list[ParentRef] = []
        if info.format == "lora":
            all_parents.append(self.bind_adapter(info, base))
        elif base is not None:
            raise InvalidInputError("--base applies only to LoRA adapters", param="base")
        return self.import_info(
            info,
            name,
            progress=progress,
            operation=operation,
            parents=[*all_parents, *parents],
            params={"source": source.name, **(params or {})},
            tenant_id=tenant_id,
        )

    def bind_adapter(self, info: ModelInfo, base: str | None) -> ParentRef:
        """Check that a LoRA adapter fits its base model and record the base in the adapter's metadata."""
        if base is None:
            raise InvalidInputError("a LoRA adapter needs --base NAME: the registered model it was trained on")
        try:
            base_view = self.show(base)
        except ModelNotFoundError as exc:
            raise InvalidModelFileError(f"the adapter's base model {base!r} is not registered") from exc
        if base_view.format != "hf":
            raise InvalidModelFileError(
                f"LoRA adapters run on the PyTorch backend; {base_view.name} is {base_view.format}"
                " (make a Hugging Face copy with `llmos convert NAME --to safetensors`)"
            )
        shape = base_view.details.get("shape") or {}
        layers, hidden = info.metadata.get("adapter_layers"), info.metadata.get("adapter_hidden")
        if (layers and shape.get("layers") and layers > shape["layers"]) or (
            hidden and shape.get("embedding") and hidden != shape["embedding"]
        ):
            raise InvalidModelFileError(
                f"the adapter was trained for another architecture ({layers} layers, hidden size {hidden}) than"
                f" {base_view.name} ({shape.get('layers')} layers, hidden size {shape.get('embedding')})"
            )
        info.architecture = base_view.architecture
        info.metadata.update({"base_digest": base_view.digest, "base_name": base_view.name})
        return ParentRef(base_view.digest, base_view.name)

    def import_info(
        self,
        info: ModelInfo,
        name: str,
        *,
        progress: ProgressFactory | None = None,
        operation: str = "import",
        parents: Sequence[ParentRef] = (),
        params: dict[str, Any] | None = None,
        tenant_id: int | None = None,
        encrypt: bool = False,
    ) -> VersionView:
        """Copy the files of an inspected model into the store and register them as a version of ``name``.

        A new model belongs to ``tenant_id`` (None = public); adding a version to an existing model of another
        tenant is refused. ``encrypt`` asks for encryption at rest (when a key is configured) beyond the default
        rule, e.g. for a conversion of an encrypted version.
        """
        ref = parse_ref(name)
        if ref.digest:
            raise ConflictError("cannot import under a digest; give a name with an optional :tag", param="name")
        encrypt = self.blobs.cipher is not None and (
            encrypt or info.format in ("lora", "dataset") or operation in ENCRYPTED_OPERATIONS
        )
        with self.blobs.writing():
            stored: list[BlobInfo] = []
            for model_file in info.files:
                callback = progress(model_file.path, model_file.size) if progress else None
                blob = self.blobs.write_file(model_file.source, progress=callback, encrypt=encrypt)
                if blob.size != model_file.size:
                    raise InvalidModelFileError(
                        f"{model_file.path} changed while it was being imported"
                        f" ({model_file.size} -> {blob.size} bytes)"
                    )
                stored.append(blob)
            return self.add_version(
                ref, info, stored, operation=operation, parents=parents, params=params, tenant_id=tenant_id
            )

    def add_version(
        self,
        ref: ModelRef,
        info: ModelInfo,
        blobs: Sequence[BlobInfo],
        *,
        operation: str,
        parents: Sequence[ParentRef] = (),
        params: dict[str, Any] | None = None,
        tenant_id: int | None = None,
    ) -> VersionView:
        """Register a version whose blobs are already stored (call within ``self.blobs.writing()``).

        Another front end of the same database may create the same model, version or tag at the same moment; the
        database refuses the later transaction (a unique violation on PostgreSQL, a stale snapshot, "database is
        locked", on SQLite), which then runs once more and finds the other's rows.
        """
        for attempt in range(2):
            try:
                return self._add_version_once(
                    ref, info, blobs, operation=operation, parents=parents, params=params, tenant_id=tenant_id
                )
            except (UniqueViolation, OperationalError) as exc:
                if attempt or (isinstance(exc, OperationalError) and "locked" not in str(exc.orig)):
                    raise
        raise AssertionError("unreachable")

    def _add_version_once(
        self,
        ref: ModelRef,
        info: ModelInfo,
        blobs: Sequence[BlobInfo],
        *,
        operation: str,
        parents: Sequence[ParentRef] = (),
        params: dict[str, Any] | None = None,
        tenant_id: int | None = None,
    ) -> VersionView:
        files = [
            {"path": model_file.path, "digest": blob.digest, "size": blob.size}
            for model_file, blob in zip(info.files, blobs, strict=True)
        ]
        manifest = canonical_json({"schema": MANIFEST_SCHEMA, **info.manifest_config(), "files": files})
        digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        tag = ref.tag or DEFAULT_TAG
        with self.session() as session, session.begin():
            model = self._get_or_create_model(session, ref, tenant_id)
            if model.tenant_id != tenant_id and tenant_id is not None:
                raise ConflictError(f"{ref.repository} belongs to another tenant; choose another name", param="name")
            kinds = {v.format == "dataset" for v in model.versions}
            if kinds and kinds != {info.format == "dataset"}:
                existing = "a dataset" if True in kinds else "a model"
                raise ConflictError(f"{ref.repository} is already {existing}; choose another name", param="name")
            version = session.scalar(
                select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.digest == digest)
            )
            if version is None:
                version = ModelVersion(
                    model=model,
                    digest=digest,
                    manifest=manifest.decode("utf-8"),
                    format=info.format,
                    architecture=info.architecture,
                    parameter_count=info.parameter_count,
                    quantization=info.quantization,
                    context_length=info.context_length,
                    chat_template=info.chat_template,
                    tokenizer=info.tokenizer,
                    details=info.metadata,
                    size=info.size,
                )
                version.files = [VersionFile(path=f["path"], blob_digest=f["digest"], size=f["size"]) for f in files]
                version.lineage = [
                    Lineage(operation=operation, parent_digest=p.digest, parent_name=p.name, params=params or {})
                    for p in parents
                ] or [Lineage(operation=operation, params=params or {})]
                session.add(version)
                session.flush()
            self._set_tag(session, model, tag, version)
            session.flush()
            session.refresh(model)
            return version_view(version, ref.repository, tag)

    def _get_or_create_model(self, session: Session, ref: ModelRef, tenant_id: int | None = None) -> Model:
        model = session.scalar(select(Model).where(Model.namespace == ref.namespace, Model.name == ref.name))
        if model is None:
            model = Model(namespace=ref.namespace, name=ref.name, tenant_id=tenant_id)
            session.add(model)
            session.flush()
        return model

    def _set_tag(self, session: Session, model: Model, tag: str, version: ModelVersion, reason: str = "tag") -> None:
        """Point ``tag`` at ``version``, recording the move in the tag's history (when it really moves)."""
        existing = session.scalar(select(Tag).where(Tag.model_id == model.id, Tag.tag == tag))
        previous_version = existing.version if existing else None
        if existing is None:
            session.add(Tag(model=model, tag=tag, version=version))
        elif existing.version_id != version.id:
            existing.version = version
            existing.updated_at = utcnow()
        if previous_version is None or previous_version.id != version.id:
            session.add(
                TagHistory(
                    model_id=model.id,
                    tag=tag,
                    digest=version.digest,
                    previous_digest=previous_version.digest if previous_version else None,
                    reason=reason[:255],
                )
            )
        session.flush()
        trimmed = self._trim_history(session, model, tag)
        if previous_version is not None and previous_version.id != version.id:
            trimmed.add(previous_version.digest)
        for digest in trimmed:
            stale = session.scalar(
                select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.digest == digest)
            )
            if stale is not None:
                self._drop_if_untagged(session, stale)

    def _trim_history(self, session: Session, model: Model, tag: str) -> set[str]:
        """Keep the newest :data:`HISTORY_PER_TAG` moves of a tag; the digests the dropped entries named."""
        rows = session.scalars(
            select(TagHistory)
            .where(TagHistory.model_id == model.id, TagHistory.tag == tag)
            .order_by(TagHistory.id.desc())
            .offset(HISTORY_PER_TAG)
        ).all()
        for row in rows:
            session.delete(row)
        session.flush()
        return {row.digest for row in rows}

    def _drop_if_untagged(self, session: Session, version: ModelVersion) -> bool:
        """Delete a version no tag points at and no alias's recent history names (rollback may still need it).

        Every tag but ``latest`` counts as an alias here: ``latest`` moves with each import, and keeping every
        version it ever named would keep every import.
        """
        remaining = session.scalar(select(func.count()).select_from(Tag).where(Tag.version_id == version.id))
        if remaining:
            return False
        in_history = session.scalar(
            select(func.count())
            .select_from(TagHistory)
            .where(
                TagHistory.model_id == version.model_id,
                TagHistory.digest == version.digest,
                TagHistory.tag != DEFAULT_TAG,  # `latest` follows imports; old imports are not kept for it
            )
        )
        if in_history:
            return False
        session.delete(version)
        session.flush()
        return True

    def tag(self, source: str, target: str, *, reason: str = "tag") -> VersionView:
        """Point ``target`` (a name with optional tag) at the version ``source`` resolves to.

        ``reason`` goes into the tag's history (``llmos history``): who or what moved it. A new target model belongs
        to the source's tenant, and a tenant's version is never tagged into a model of another owner (public
        included): tagging under a new name does not publish it.
        """
        src_ref = parse_ref(source)
        dst_ref = parse_ref(target)
        if dst_ref.digest:
            raise ConflictError(
                "the target of a tag must be a name with an optional :tag, not a digest", param="target"
            )
        with self.session() as session, session.begin():
            src_version = self._resolve_version(session, src_ref)
            owner = src_version.model.tenant_id
            model = self._get_or_create_model(session, dst_ref, owner)
            if owner is not None and model.tenant_id != owner:
                raise ConflictError(
                    f"{src_ref.repository} belongs to a tenant and {dst_ref.repository} does not belong to the same"
                    " one; choose another name",
                    param="target",
                )
            version = session.scalar(
                select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.digest == src_version.digest)
            )
            if version is None:
                with session.no_autoflush:  # a half-built copy is never flushed
                    version = _copy_version(src_version, model)
                session.add(version)
                session.flush()
            self._set_tag(session, model, dst_ref.tag or DEFAULT_TAG, version, reason)
            session.flush()
            session.refresh(model)
            return version_view(version, dst_ref.repository, dst_ref.tag)

    def remove(self, name: str) -> RemoveResult:
        """Remove a tag (and its version when no other tag or alias history keeps it), or a version by digest.

        Removing a tag also forgets its history; removing a model's last tag removes the model.
        """
        ref = parse_ref(name)
        result = RemoveResult()
        candidates: set[str] = set()
        with self.session() as session, session.begin():
            model = self._find_model(session, ref)
            version = self._resolve_version(session, ref)
            candidates.update(f.blob_digest for f in version.files)
            if ref.digest:
                result.removed_tags = [f"{ref.repository}:{t.tag}" for t in model.tags if t.version_id == version.id]
                session.delete(version)
                result.removed_versions.append(version.digest)
            else:
                tag = session.scalar(select(Tag).where(Tag.model_id == model.id, Tag.tag == ref.tag))
                assert tag is not None  # _resolve_version found it
                session.delete(tag)
                for row in session.scalars(
                    select(TagHistory).where(TagHistory.model_id == model.id, TagHistory.tag == ref.tag)
                ):
                    session.delete(row)
                session.flush()
                result.removed_tags.append(str(ref))
                if session.scalar(select(func.count()).select_from(Tag).where(Tag.model_id == model.id)):
                    if self._drop_if_untagged(session, version):
                        result.removed_versions.append(version.digest)
                else:  # no tag left: the versions only other tags' history kept go too
                    for stale in list(model.versions):
                        candidates.update(f.blob_digest for f in stale.files)
                        result.removed_versions.append(stale.digest)
                        session.delete(stale)
            session.flush()
            if not session.scalar(
                select(func.count()).select_from(ModelVersion).where(ModelVersion.model_id == model.id)
            ):
                session.expire(model)
                session.delete(model)
        result.deleted_blobs = self._delete_unreferenced(candidates)
        return result

    def _delete_unreferenced(self, digests: Iterable[str]) -> list[str]:
        deleted: list[str] = []
        with self.blobs.maintenance(wait_s=10.0) as acquired:
            if not acquired:  # a writer is busy; maintain() at a later start removes them
                return deleted
            with self.session() as session:
                referenced = self.referenced_blobs(session)
            for digest in sorted(set(digests) - referenced):
                if self.blobs.delete(digest):
                    deleted.append(digest)
        return deleted

    # --- reading ----------------------------------------------------------------------------------------------------

    def _find_model(self, session: Session, ref: ModelRef) -> Model:
        model = session.scalar(
            select(Model)
            .where(Model.namespace == ref.namespace, Model.name == ref.name)
            .options(selectinload(Model.tags))
        )
        if model is None:
            raise ModelNotFoundError(f"model {ref.repository!r} not found; `llmos list` shows what is available")
        return model

    def _resolve_version(self, session: Session, ref: ModelRef) -> ModelVersion:
        model = self._find_model(session, ref)
        if ref.digest:
            version = session.scalar(
                select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.digest == ref.digest)
            )
        else:
            tag = session.scalar(select(Tag).where(Tag.model_id == model.id, Tag.tag == ref.tag))
            version = tag.version if tag else None
        if version is None:
            raise ModelNotFoundError(f"model {str(ref)!r} not found; `llmos list` shows what is available")
        return version

    def list_versions(self, kind: str = "model") -> list[VersionView]:
        """One entry per tag, ordered by name: of models (``kind="model"``), datasets (``"dataset"``) or ``"all"``."""
        with self.session() as session:
            query = select(Tag).join(Model).join(ModelVersion, Tag.version_id == ModelVersion.id)
            if kind == "model":
                query = query.where(ModelVersion.format != "dataset")
            elif kind == "dataset":
                query = query.where(ModelVersion.format == "dataset")
            tags = session.scalars(
                query.order_by(Model.namespace, Model.name, Tag.tag).options(
                    selectinload(Tag.model).selectinload(Model.tags),
                    selectinload(Tag.version).selectinload(ModelVersion.files),
                    selectinload(Tag.version).selectinload(ModelVersion.lineage),
                )
            ).all()
            return [version_view(t.version, ModelRef(t.model.namespace, t.model.name).repository, t.tag) for t in tags]

    def show(self, name: str) -> VersionView:
        ref = parse_ref(name)
        with self.session() as session:
            version = self._resolve_version(session, ref)
            return version_view(version, ref.repository, ref.tag)

    def resolve(self, name: str, *, verify: bool = False) -> ResolvedModel:
        """Find a version and the blob paths of its files, checking that they are present.

        With ``verify``, also check that each file's bytes still hash to its digest (:meth:`check_integrity`: always
        re-hashed, never taken from a cache). Missing or damaged files raise
        :class:`~llmos.errors.ModelUnavailableError` naming the model and the file.
        """
        view = self.show(name)
        paths: dict[str, Path] = {}
        for file in view.files:
            path = self.blobs.path(file.digest)
            if not path.is_file() and self.blob_fetcher is not None:
                self.blob_fetcher(self.blobs, file.digest)  # registered by another front end: its bytes are there
            if not path.is_file():
                raise ModelUnavailableError(
                    f"{view.name} cannot be loaded: its file {file.path} is missing from the store (run `llmos verify`)"
                )
            paths[file.path] = path
        resolved = ResolvedModel(view, paths)
        if verify:
            self.check_integrity(resolved)
        return resolved

    def check_integrity(self, resolved: ResolvedModel) -> None:
        """Re-hash every file of ``resolved`` against its digest; call it before loading the files.

        Every call reads the bytes again (about 0.1 s for 100 MB): a cache keyed on size, mtime or inode would miss
        a byte changed in place with its mtime put back. Encrypted blobs are decrypted to hash them, so their AEAD
        tags authenticate them as well. A difference raises :class:`~llmos.errors.ModelUnavailableError` naming the
        model and the damaged file.
        """
        view = resolved.view
        for file in view.files:
            prefix = f"{view.name} cannot be loaded: its file {file.path}"
            hasher = hashlib.sha256()
            try:
                encrypted = self.blobs.is_encrypted(file.digest)
                if not encrypted and self.blobs.size(file.digest) != file.size:
                    raise ModelUnavailableError(f"{prefix} is damaged on disk (its size changed; run `llmos verify`)")
                if encrypted and self.blobs.cipher is None:
                    raise ModelUnavailableError(f"{prefix} is encrypted; set LLMOS_ENCRYPTION_KEY to load it")
                for chunk in self.blobs.read_chunks(file.digest):
                    hasher.update(chunk)
            except IntegrityError as exc:  # missing, or failed decryption (damaged, or another key)
                missing = not self.blobs.exists(file.digest)
                raise ModelUnavailableError(
                    f"{prefix} is missing from the store (run `llmos verify`)"
                    if missing
                    else f"{prefix} is damaged on disk (it fails decryption: damaged, or encrypted with another key;"
                    " run `llmos verify`)"
                ) from exc
            except OSError as exc:
                raise ModelUnavailableError(f"{prefix} cannot be read: {exc.strerror or exc}") from exc
            if f"sha256:{hasher.hexdigest()}" != file.digest:
                raise ModelUnavailableError(
                    f"{prefix} is damaged on disk (its bytes no longer match their digest; run `llmos verify`)"
                )

    def verify(self, progress: ProgressFactory | None = None) -> VerifyReport:
        """Re-hash every blob and every manifest; report corruption and missing blobs."""
        report = VerifyReport()
        with self.session() as session:
            versions = session.scalars(
                select(ModelVersion).options(selectinload(ModelVersion.files), selectinload(ModelVersion.model))
            ).all()
            users: dict[str, list[str]] = {}
            for version in versions:
                name = ModelRef(version.model.namespace, version.model.name, None, version.digest)
                if f"sha256:{hashlib.sha256(version.manifest.encode('utf-8')).hexdigest()}" != version.digest:
                    report.bad_manifests.append(str(name))
                for file in version.files:
                    users.setdefault(file.blob_digest, []).append(str(name))
        on_disk = set(self.blobs.iter_digests())
        for digest in sorted(users):
            if digest not in on_disk:
                report.missing.append(digest)
                report.affected[digest] = users[digest]
                continue
            callback = progress(digest, self.blobs.size(digest)) if progress else None
            actual = self.blobs.rehash(digest)
            if callback:
                callback(self.blobs.size(digest))
            report.checked += 1
            if actual != digest:
                report.corrupt.append(digest)
                report.affected[digest] = users[digest]
        return report


def _copy_version(source: ModelVersion, model: Model) -> ModelVersion:
    copy = ModelVersion(
        model=model,
        digest=source.digest,
        manifest=source.manifest,
        format=source.format,
        architecture=source.architecture,
        parameter_count=source.parameter_count,
        quantization=source.quantization,
        context_length=source.context_length,
        chat_template=source.chat_template,
        tokenizer=dict(source.tokenizer),
        details=dict(source.details),
        size=source.size,
    )
    copy.files = [VersionFile(path=f.path, blob_digest=f.blob_digest, size=f.size) for f in source.files]
    copy.lineage = [
        Lineage(
            operation=lin.operation,
            parent_digest=lin.parent_digest,
            parent_name=lin.parent_name,
            params=dict(lin.params),
        )
        for lin in source.lineage
    ]
    return copy
