"""Shared fixtures (helpers live in the tests.helpers package)."""

import pytest

from tests.helpers import TINY_MODEL


@pytest.fixture
def tiny_model() -> str:
    return TINY_MODEL
