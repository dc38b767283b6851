"""Data: tokenizer, token files (hai-data), packed FIM dataset and deterministic sampler (paper 4.1).

`DataError` lives here, free of heavy imports, because the spawned hai-data workers import this package.
"""


class DataError(ValueError):
    """A data file is missing, corrupt or inconsistent with the config; the message names the file and the fix."""
