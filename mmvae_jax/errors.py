"""One-line error messages."""


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first line of an exception's message (at most `limit` characters), or its type name."""
  text = str(e).strip()
  return text.splitlines()[0][:limit] if text else type(e).__name__
