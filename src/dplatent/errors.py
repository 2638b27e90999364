"""Error types that the CLI turns into one clear message (no traceback)."""


class DplatentError(Exception):
    """Base class: a problem the user can fix; printed as one line by the CLI."""


class DataError(DplatentError):
    """A data file is missing, malformed or inconsistent."""


class ConfigError(DplatentError):
    """A configuration value is invalid."""


class PrivacyError(DplatentError):
    """A privacy budget cannot be met or a ledger is inconsistent."""
