"""The browser app: the FastAPI + Gradio server and the page layout around the tabs in ``tabs/``.

The engine (``studio/``) never imports gradio; this package is the only place gradio meets the Studio object.
"""
