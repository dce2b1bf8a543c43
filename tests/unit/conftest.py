"""Fixtures shared by the unit tests: signing keys, made once per module (RSA generation is slow)."""

from __future__ import annotations

import pytest

from tests.support.jwt_keys import SigningKey, ec_key, ed_key, rsa_key


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return rsa_key("rsa-1")


@pytest.fixture(scope="module")
def ec() -> SigningKey:
    return ec_key("ec-1")


@pytest.fixture(scope="module")
def ed() -> SigningKey:
    return ed_key("ed-1")
