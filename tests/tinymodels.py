"""Tiny seeded random models for tests (built by studio.demo) and writers for the on-disk formats."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio.demo import make_pipeline, make_tiny, write_diffusers_folder, write_single_file  # noqa: E402,F401
