"""The GPU checks as pytest tests (one per check of ``python -m tests.gpu.check``), skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from tests.gpu import check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs an NVIDIA GPU: torch.cuda.is_available() is False "
                                       "(python -m tests.gpu.check --device cpu runs the CPU smoke version)")

NAMES = [name for name, _ in check.plan(None)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = check.make_env("cuda", quick=True, root=tmp_path_factory.mktemp("gpucheck"))
    yield env
    env.close_shared()


@pytest.mark.parametrize("name", NAMES)
def test_gpu_check(env, name):
    result = check.run_check(name, dict(check.plan(env))[name])
    if result.status == "SKIP":
        pytest.skip(result.detail)
    assert result.status == "PASS", result.line()
