from studio.extension_api import hookimpl


@hookimpl
def studio_no_such_hook(api):
    return None
