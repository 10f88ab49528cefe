"""The studio engine: usable from Python without any UI. Never imports gradio."""

__version__ = "0.1.0"
