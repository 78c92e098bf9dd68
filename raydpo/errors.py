"""The one base class of a user's error: a config, data source, output folder, cache or checkpoint
that the user must fix. A job prints the message alone (no traceback) and exits 2.

It lives in its own module so that every layer (``config``, ``data``, ``train``, ``actors``) can
raise it without importing another layer; a job catches ``InputError`` once, wherever it was raised
(in the driver or inside a Ray task: see ``input_error``)."""
from __future__ import annotations


class InputError(Exception):
    """The user's input cannot be used; the message names the file, key or row and what to do."""

    def __init__(self, message: str, *more: object) -> None:
        super().__init__(message, *more)
        self.message = message

    def __str__(self) -> str:
        # The message as raised: Ray Data appends lines of retry advice to a failed task's exception
        # (its args), which would turn the one line a job prints into three, the last misleading.
        return self.message


def find_cause(error: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    """The exception of ``kinds`` that ``error`` is or wraps, or None. Ray re-raises a task's
    exception as a ``RayTaskError`` subclass of the original's class whose ``cause`` is the
    original (that one is returned, with its own message); Ray Data and Ray Train chain theirs
    through ``__cause__``. Follows each link once, so a cycle cannot loop."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, kinds) and not isinstance(cause, kinds):
            return e
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]
    return None


def input_error(error: BaseException) -> InputError | None:
    """The ``InputError`` that ``error`` is or wraps (see ``find_cause``), or None."""
    found = find_cause(error, InputError)
    return found if isinstance(found, InputError) else None
