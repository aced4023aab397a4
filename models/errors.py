"""The one user-facing error type (here so `models/` and `engine/` can both raise it): printed as a single line, exit code 2, no traceback."""


class TenureError(Exception):
    """Bad input from the user (config, data, files, checkpoints).

    The message names the file, line, field or config key at fault, e.g.
    ``data/train.jsonl:17: field 'label': expected a string, got null``.
    """
