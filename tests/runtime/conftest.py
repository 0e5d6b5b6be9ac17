"""Every runtime test runs with one-level and two-level activation quantization."""

import pytest

from runtime_helpers import ACTIVATIONS


@pytest.fixture(autouse=True, params=["int8", "int8x2"])
def activation_mode(request):
    ACTIVATIONS["mode"] = request.param
    yield request.param
    ACTIVATIONS["mode"] = "int8x2"
