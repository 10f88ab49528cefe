"""The server answers before the ML stack is imported: Studio() and the whole app build without torch."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "skimage")

CODE = textwrap.dedent(f"""
    import argparse, os, sys, tempfile
    from studio.app import Studio
    from studio.settings import Settings
    from webui.server import api_routers, build_app

    tmp = tempfile.mkdtemp()
    settings = Settings(models_dir=tmp + "/models", data_dir=tmp + "/data", outdir=tmp + "/out",
                        extensions_dir={str(ROOT / "extensions")!r})
    studio = Studio(settings)
    args = argparse.Namespace(api=True, nowebui=False, api_auth=None, gradio_auth=None, listen=False)
    build_app(studio, args, extra_routers=api_routers(studio, args))
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    assert not heavy, f"imported while building the server: {{heavy}}"
    assert "not resolved yet" in studio.manager.stats()["device"]  # the Settings tab's status line
    studio.warm_up()
    assert "torch" in sys.modules and "diffusers" in sys.modules
    assert studio.manager.stats()["device"] == "cpu"
    studio.close()
    print("ok")
""")


def test_studio_and_app_build_without_torch_and_warm_up_loads_it():
    done = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                               "HOME": str(Path.home())})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


GENERATE_DURING_WARM_UP = textwrap.dedent("""
    import sys, tempfile, threading
    from studio.app import Studio
    from studio.request import GenerationRequest
    from studio.settings import Settings

    tmp = tempfile.mkdtemp()
    studio = Studio(Settings(models_dir=sys.argv[1], data_dir=tmp + "/data", outdir=tmp + "/out",
                             default_checkpoint="tiny.safetensors"), load_extensions=False)
    assert "torch" not in sys.modules
    warm = threading.Thread(target=studio.warm_up)  # what the server does once the port answers
    warm.start()
    result = studio.generate(GenerationRequest(prompt="clicked early", steps=1, width=64, height=64), timeout=600)
    warm.join()
    assert len(result.images) == 1 and "clicked early" in result.infotexts[0]
    studio.close()
    print("ok")
""")


def test_generate_during_warm_up_waits_for_it(tmp_path):
    """diffusers' lazy imports are not thread-safe: a model load racing the warm-up imports used to fail."""
    from tests import tinymodels
    (tmp_path / "Stable-diffusion").mkdir()
    tiny = tinymodels.make_tiny("sd1", seed=0)
    tinymodels.write_single_file(tiny, tmp_path / "Stable-diffusion" / "tiny.safetensors")
    done = subprocess.run([sys.executable, "-c", GENERATE_DURING_WARM_UP, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(Path.home())})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
