"""One studio over the trained demo model (studio/demo_assets/demo-shapes.safetensors) for the effect tests.

The model is only read, so one studio serves the whole session; every test names its seeds, so results do not
depend on the order the tests run in.
"""
from __future__ import annotations

import pytest

from studio.demo import TRAINED_NAME


@pytest.fixture(scope="session")
def demo_studio(tmp_path_factory):
    from studio.app import Studio
    from studio.demo import install_demo_model
    from studio.settings import Settings

    root = tmp_path_factory.mktemp("effects")
    settings = Settings(models_dir=str(root / "models"), data_dir=str(root / "data"), outdir=str(root / "outputs"),
                        default_checkpoint=TRAINED_NAME)
    install_demo_model(settings)
    studio = Studio(settings, load_extensions=False)
    yield studio
    studio.queue.interrupt()
    studio.close()


@pytest.fixture(scope="session")
def api_client(demo_studio):
    """The A1111 REST API over the same studio, in process (no socket)."""
    from fastapi.testclient import TestClient

    from tests.api.conftest import make_app

    with TestClient(make_app(demo_studio)) as client:
        yield client
