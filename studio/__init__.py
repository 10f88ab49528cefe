"""The studio engine: usable from Python without any UI. Never imports gradio."""
