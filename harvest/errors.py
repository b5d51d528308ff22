import signal


class HarvestError(Exception):
    """A problem the user can fix (bad flag, missing file, unreachable model): printed as one line."""


def yaml_problem(exc) -> str:
    """A YAML error in one line, with its position: `line 3, column 7: mapping values are not allowed here`
    (PyYAML's own message quotes the line and draws a caret under it, over several lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


class Interrupted(BaseException):
    """SIGINT or SIGTERM (what SLURM and Kubernetes send before they kill): printed as one line, exit
    128 + the signal's number, as a shell reports a process its signal ended.

    Not an Exception, so that no `except Exception` on the way takes it for a failure of its own
    (an unreadable chunk, a full disk).
    """

    def __init__(self, signum: int, message: str = "interrupted"):
        super().__init__(message)
        self.signum = signum
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def saying(self, message: str) -> "Interrupted":
        return Interrupted(self.signum, message)


class signals_interrupt:
    """Within it, SIGTERM (and SIGINT) raise Interrupted in the main thread; outside the main thread
    (a dask worker) nothing is installed. `defer()` makes the first signal only set `received`, for a
    loop that stops at its next safe point; a second one raises at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.deferring = False
        self._previous: dict = {}

    def __enter__(self) -> "signals_interrupt":
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.deferring and self.received is None:
            self.received = signum
            return
        raise Interrupted(signum)
