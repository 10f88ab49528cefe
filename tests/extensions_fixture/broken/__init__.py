from studio.extension_api import hookimpl


@hookimpl
def studio_after_image(api, image):
    raise RuntimeError("broken extension exploded")


@hookimpl
def studio_on_step(api, step):
    raise ValueError("step hook failure")
