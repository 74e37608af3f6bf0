from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory):
    """A seeded tiny SD3 component directory (diffusers layout), built once per session."""
    from mmdit.tiny_components import make_tiny_components

    return make_tiny_components(tmp_path_factory.mktemp("components") / "sd3-tiny", seed=0)
