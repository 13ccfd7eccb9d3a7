"""Errors every entry point treats alike (kept apart so any module can raise them)."""


class UserError(Exception):
  """A failure the user fixes (input, config, files); printed without a traceback."""
