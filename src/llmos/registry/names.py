"""The name grammar for registry objects.

Contract: :func:`parse_ref` accepts exactly

* ``[namespace/]name[:tag]`` (tag defaults to ``latest``, namespace to ``library``), or
* ``[namespace/]name@sha256:<64 hex>`` (a version by digest),

where namespace and name are 1-64 characters of ``a-z 0-9 . _ -`` starting with a letter or digit and never
containing ``..``, and a tag is 1-128 characters of ``a-z 0-9 . _ -`` starting with a letter, digit or ``_``.
Names are case-insensitive and normalised to lowercase. The whole reference is at most 255 characters. Anything else
raises :class:`~llmos.errors.InvalidNameError` with a message that says which part is wrong. Because no component
can contain ``/`` or ``..`` or start with ``.``, a parsed name is always safe to use as a path component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmos.errors import InvalidNameError

DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_REF_LENGTH = 255

_COMPONENT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_TAG = re.compile(r"^[a-z0-9_][a-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
GRAMMAR_HINT = "names look like [namespace/]name[:tag] or [namespace/]name@sha256:<64 hex digits>"


@dataclass(frozen=True)
class ModelRef:
    namespace: str
    name: str
    tag: str | None = DEFAULT_TAG
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``name`` in the default namespace, ``namespace/name`` elsewhere."""
        return self.name if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}"

    def with_tag(self, tag: str) -> ModelRef:
        return ModelRef(self.namespace, self.name, _check_tag(tag.lower(), tag), None)


def _fail(ref: str, why: str) -> InvalidNameError:
    shown = ref if len(ref) <= 80 else ref[:77] + "..."
    return InvalidNameError(f"invalid name {shown!r}: {why}; {GRAMMAR_HINT}", param="name")


def _check_component(value: str, ref: str, what: str) -> str:
    if not value:
        raise _fail(ref, f"the {what} is empty")
    if ".." in value:
        raise _fail(ref, f"the {what} must not contain '..'")
    if not _COMPONENT.match(value):
        raise _fail(
            ref,
            f"the {what} {value!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-' starting with a letter or digit",
        )
    return value


def _check_tag(tag: str, ref: str) -> str:
    if not tag:
        raise _fail(ref, "the tag after ':' is empty")
    if not _TAG.match(tag):
        raise _fail(ref, f"the tag {tag!r} must be 1-128 characters of a-z, 0-9, '.', '_', '-'")
    return tag


def parse_ref(ref: str, *, default_tag: str = DEFAULT_TAG) -> ModelRef:
    """Parse and validate a model reference."""
    if not isinstance(ref, str):
        raise InvalidNameError(f"a name must be a string; {GRAMMAR_HINT}", param="name")
    if len(ref) > MAX_REF_LENGTH:
        raise _fail(ref, f"it is {len(ref)} characters long (at most {MAX_REF_LENGTH})")
    if ref != ref.strip() or not ref:
        raise _fail(ref, "it is empty or has surrounding whitespace")
    lowered = ref.lower()
    digest: str | None = None
    tag: str | None = default_tag
    rest = lowered
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise _fail(ref, "the digest after '@' must be 'sha256:' followed by exactly 64 hex digits")
        tag = None
    if ":" in rest:
        if digest is not None:
            raise _fail(ref, "give either a tag or a digest, not both")
        rest, tag = rest.rsplit(":", 1)
        _check_tag(tag, ref)
    parts = rest.split("/")
    if len(parts) > 2:
        raise _fail(ref, "at most one '/' (namespace/name) is allowed")
    namespace = _check_component(parts[0], ref, "namespace") if len(parts) == 2 else DEFAULT_NAMESPACE
    name = _check_component(parts[-1], ref, "name")
    return ModelRef(namespace, name, tag, digest)
