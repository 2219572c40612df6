"""Who is calling, and what their role allows.

Contract: plain data and pure functions. A :class:`Principal` is the authenticated caller (or the implicit local
admin when authentication is off). Roles are ordered ``consumer < developer < admin``; :func:`can_create_role` says
whether a caller may mint a key of a given role (never a higher one than its own, and only an admin for another
tenant). Model visibility: a model is visible to its own tenant and to admins; public models (no tenant) to all;
a key's model allow-list narrows what it may use further.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("consumer", "developer", "admin")
RANK = {role: index for index, role in enumerate(ROLES)}
LOCAL_TENANT = "default"


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: int | None = None
    budget_period: str = "month"


@dataclass(frozen=True)
class Principal:
    tenant: str
    tenant_id: int | None
    role: str
    key_prefix: str | None = None
    models: tuple[str, ...] | None = None
    """Model allow-list of the key (names or repositories); None = every model the tenant can see."""
    key_limits: Limits = field(default_factory=Limits)
    tenant_limits: Limits = field(default_factory=Limits)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def at_least(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]

    @property
    def actor(self) -> str:
        return self.key_prefix or "local"

    def may_see(self, owner_tenant_id: int | None) -> bool:
        return self.is_admin or owner_tenant_id is None or owner_tenant_id == self.tenant_id

    def may_use(self, repository: str, name: str) -> bool:
        return self.models is None or repository in self.models or name in self.models


LOCAL_ADMIN = Principal(tenant=LOCAL_TENANT, tenant_id=None, role="admin")
"""The caller when authentication is off: the server binds loopback only, so whoever can reach it is the owner."""


def can_create_role(creator: Principal, role: str, tenant: str) -> bool:
    if role not in RANK:
        return False
    if creator.is_admin:
        return True
    return RANK[role] <= RANK[creator.role] and tenant == creator.tenant and creator.at_least("developer")
