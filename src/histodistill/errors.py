"""Project exceptions: each names the offending file, slide or key and says what to do."""


class HistodistillError(Exception):
    """Base class of every error histodistill raises on purpose (bad input, bad config)."""


class ConfigError(HistodistillError):
    """The config or the sample sheet breaks the schema."""


class SlideError(HistodistillError):
    """A slide is missing, unreadable, or unusable."""


class MppError(SlideError):
    """A slide's microns-per-pixel is unknown or implausible."""


class NoTissueError(SlideError):
    """A slide has no tissue (raised only when `tiling.on_no_tissue` is `error`)."""


class ModelError(HistodistillError):
    """A model name is unknown, or its weights are missing, gated or do not fit the architecture."""
