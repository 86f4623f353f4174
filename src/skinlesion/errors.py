"""The one exception type for problems a user can fix; the CLI prints it as one line (exit 2)."""


class SkinLesionError(Exception):
    """A user-fixable problem: bad path, bad CSV, bad flag combination, unreadable image..."""
