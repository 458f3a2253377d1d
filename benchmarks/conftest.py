import gin
import pytest


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    import qvpo.config  # noqa: F401
    yield
    gin.clear_config()
