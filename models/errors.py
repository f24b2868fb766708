"""The one base class of the errors a user can cause, so the edges can tell them from bugs.

An `LvaError` is something the user can fix (a bad file, an unknown model, a prompt too long), said in
one line. It lives here, in the lowest package, so that models/, convert/ and assistant/ all raise it.
The edges treat it so: `lva` prints `lva: error: MESSAGE` and exits with `exit_code`, the chat app shows
the message, and `lva serve` answers `http_status` in the API's error shape. Anything else that reaches
an edge is a bug: `lva` prints its traceback and asks for a report, `lva serve` answers 500 and writes the
traceback to its log.
"""

from __future__ import annotations


class LvaError(Exception):
    """Something the user can fix; str() is one line that says what, and where it helps, what to do."""

    exit_code: int = 1              # what `lva` exits with
    http_status: int = 400          # what `lva serve` answers (5xx for a kind that is the server's, not the request's)
