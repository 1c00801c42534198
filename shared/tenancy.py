"""Who is asking: a :class:`Principal` is a tenant and the scopes it holds there.

Every client credential (an ``API_KEYS`` entry, an OIDC bearer token, a run's read token)
becomes one Principal (services/api/auth.py); a run belongs to the tenant that started it
(shared/state.py ``tenant``), and another tenant sees no such run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

#: The tenant of a key without one, of every run when no credentials are configured, and
#: of runs recorded before tenancy existed (their hash has no ``tenant`` field).
DEFAULT_TENANT = "default"
TENANT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_TENANT = re.compile(TENANT_PATTERN)


class Scope(StrEnum):
    """What a principal may do in its tenant (the endpoint table names one per endpoint)."""

    START = "start"
    READ = "read"
    CANCEL = "cancel"
    MESSAGE = "message"
    #: Every scope, in every tenant: an operator.
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    scopes: frozenset[Scope]
    #: Who, for audit rows and logs: ``key:<n>`` (the n-th API_KEYS entry), a token's
    #: ``sub``, ``anonymous`` when no credentials are configured. Never a secret.
    subject: str
    #: A read token's one run (services/api/readtokens.py); None for every other principal.
    run: str | None = None

    @property
    def every_tenant(self) -> bool:
        return Scope.ADMIN in self.scopes

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes or self.every_tenant

    def sees(self, tenant: str | None) -> bool:
        """Whether a run of ``tenant`` (None: recorded without one) is this principal's."""
        return self.every_tenant or (tenant or DEFAULT_TENANT) == self.tenant


#: The caller when the deployment configures no credentials: one tenant, every scope.
ANONYMOUS = Principal(DEFAULT_TENANT, ALL_SCOPES, "anonymous")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One ``API_KEYS`` entry: ``KEY`` (every scope in the default tenant) or
    ``KEY@TENANT:SCOPE+SCOPE``."""

    secret: bytes = field(repr=False)
    tenant: str
    scopes: frozenset[Scope]

    @classmethod
    def parse(cls, entry: str) -> ApiKey:
        """Raises ValueError naming what is wrong (never the key itself)."""
        key, at, grant = entry.rpartition("@") if "@" in entry else (entry, "", "")
        if not at:
            return cls(entry.encode(), DEFAULT_TENANT, ALL_SCOPES)
        tenant, colon, names = grant.partition(":")
        if not key:
            raise ValueError("an entry has no key before '@'")
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"tenant {tenant!r}: letters, digits, '.', '_', '-', at most 64")
        if not colon or not names:
            raise ValueError(f"the key of tenant {tenant!r} names no scopes (KEY@TENANT:SCOPE)")
        return cls(key.encode(), tenant, parse_scopes(names.split("+")))


def parse_scopes(names: list[str]) -> frozenset[Scope]:
    """Scope names; raises ValueError naming the first unknown one."""
    wanted = [name.strip() for name in names if name.strip()]
    if unknown := [name for name in wanted if name not in Scope.__members__.values()]:
        known = ", ".join(Scope)
        raise ValueError(f"{unknown[0]!r} is not a scope (one of {known})")
    return frozenset(Scope(name) for name in wanted)
