"""Principals: API key entries, and bearer JWTs checked against a real local OIDC issuer
(tests/helpers/issuer.py serves its discovery document and JWKS over HTTP)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from flowgate.services.api.oidc import (
    ClaimMapping,
    OidcVerifier,
    TokenRefused,
    TokenWithoutGrant,
)
from flowgate.shared.settings import SettingsError, load_settings
from flowgate.shared.tenancy import ALL_SCOPES, DEFAULT_TENANT, ApiKey, Scope
from tests.helpers.issuer import AUDIENCE, LocalIssuer, local_issuer


def verifier(issuer: LocalIssuer, **overrides: object) -> OidcVerifier:
    options: dict[str, object] = {
        "issuer": issuer.url,
        "audience": AUDIENCE,
        "jwks_url": None,  # discovered
        "mapping": ClaimMapping(tenant_claim="tenant", scopes_claim="scope"),
        "refresh_s": 300.0,
        "min_refresh_s": 0.0,
        **overrides,
    }
    return OidcVerifier(**options)  # type: ignore[arg-type]


# --- API keys ----------------------------------------------------------------------------------


def test_an_api_key_entry_names_its_tenant_and_scopes() -> None:
    bare = ApiKey.parse("k1")
    assert (bare.tenant, bare.scopes) == (DEFAULT_TENANT, ALL_SCOPES)
    narrow = ApiKey.parse("s3cr@t@shop:start+read")  # a key may hold '@' itself
    assert (narrow.secret, narrow.tenant, narrow.scopes) == (
        b"s3cr@t",
        "shop",
        frozenset({Scope.START, Scope.READ}),
    )
    assert "s3cr" not in repr(narrow)


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("hush-1@shop:start+fly", "'fly' is not a scope"),
        ("hush-1@shop", "names no scopes"),
        ("hush-1@sh op:read", "tenant 'sh op'"),
        ("@shop:read", "no key before '@'"),
    ],
)
def test_a_bad_api_key_entry_stops_start_up_naming_it_without_the_key(
    entry: str, named: str
) -> None:
    with pytest.raises(SettingsError) as stopped:
        load_settings(api_keys=entry)
    assert "API_KEYS" in str(stopped.value)
    assert named in str(stopped.value)
    assert "hush" not in str(stopped.value)


# --- OIDC --------------------------------------------------------------------------------------


async def test_a_token_of_the_issuer_names_its_tenant_and_scopes() -> None:
    async with local_issuer() as issuer:
        check = verifier(issuer)
        principal = await check.principal(issuer.token(tenant="shop", scope="start read other"))
        await check.aclose()
    assert principal.tenant == "shop"
    assert principal.scopes == frozenset({Scope.START, Scope.READ})
    assert principal.subject == "user-1"


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("wrong signature", "Signature verification failed"),
        ("wrong audience", "Audience doesn't match"),
        ("expired", "Signature has expired"),
        ("another issuer", "Invalid issuer"),
    ],
)
async def test_a_token_that_is_not_the_issuers_for_this_api_is_refused(case: str, why: str) -> None:
    async with local_issuer() as issuer:
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = {
            "wrong signature": lambda: issuer.token(key=stranger),
            "wrong audience": lambda: issuer.token(audience="another-api"),
            "expired": lambda: issuer.token(expires_in_s=-120),
            "another issuer": lambda: issuer.token(iss="http://elsewhere"),
        }[case]()
        check = verifier(issuer)
        with pytest.raises(TokenRefused, match=why):
            await check.principal(token)
        await check.aclose()


async def test_a_rotated_key_works_from_its_first_token() -> None:
    async with local_issuer() as issuer:
        check = verifier(issuer)
        await check.principal(issuer.token())
        assert issuer.reads == 1
        await check.principal(issuer.token())
        assert issuer.reads == 1  # cached
        issuer.rotate()
        principal = await check.principal(issuer.token())  # an unknown kid: read again
        assert issuer.reads == 2
        with pytest.raises(TokenRefused, match="has no key 'nope'"):
            await check.principal(issuer.token(kid="nope", key=issuer.keys[issuer.kid]))
        await check.aclose()
    assert principal.tenant == "shop"


async def test_an_issuer_outage_rides_on_the_cached_keys() -> None:
    async with local_issuer() as issuer:
        check = verifier(issuer, refresh_s=0.01)  # every token finds the keys due
        await check.principal(issuer.token())
        issuer.down()
        principal = await check.principal(issuer.token())  # the read fails: cached keys
        assert principal.tenant == "shop"
        issuer.rotate()  # a key the cache never saw cannot be trusted while it is down
        with pytest.raises(TokenRefused, match="has no key"):
            await check.principal(issuer.token())
        issuer.up()
        await check.aclose()


async def test_a_token_without_a_tenant_is_403_material_and_prefixes_are_stripped() -> None:
    async with local_issuer() as issuer:
        check = verifier(issuer)
        with pytest.raises(TokenWithoutGrant, match="claim 'tenant'"):
            await check.principal(issuer.token(tenant=None))
        await check.aclose()
        prefixed = verifier(
            issuer,
            mapping=ClaimMapping(tenant_claim="", scopes_claim="roles", scope_prefix="fg:"),
        )
        principal = await prefixed.principal(
            issuer.token(tenant=None, roles=["fg:cancel", "start", "fg:admin"])
        )
        await prefixed.aclose()
    assert principal.tenant == DEFAULT_TENANT
    assert principal.scopes == frozenset({Scope.CANCEL, Scope.ADMIN})
