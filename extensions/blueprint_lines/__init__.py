"""Blueprint lines (built-in extension): a ControlNet preprocessor for plans and CAD renders."""
from studio.extension_api import ParamSpec, PreprocessorSpec, hookimpl


@hookimpl
def studio_preprocessors(api):
    from .lines import blueprint_lines
    return [PreprocessorSpec("blueprint_lines", blueprint_lines, (
        ParamSpec("block_size", "Threshold block size", 3, 255, 31, 2),
        ParamSpec("min_area", "Min blob area (px)", 0, 2000, 24, 1),
    ))]
