"""One signed-cookie session per space: its own cookie, sent only under its own prefix.

The patient portal and the privacy officer's pages are different people's spaces: a browser
signed in to one is not signed in to the other, and neither cookie goes to the FHIR API.
"""
from __future__ import annotations

from flask import request
from flask.sessions import SecureCookieSessionInterface


class SpaceSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, named and scoped by the space the request is in
    (``spaces``: URL prefix -> cookie name), opened only for a request that carries that cookie.

    Flask opens the session of every request before routing; the stock interface builds its
    itsdangerous signer first, even for the FHIR API calls that never have a cookie, a cost on
    every API request (bench/README.md, "The portal's session interface"). Without the cookie
    the answer is the same as Flask's: a new empty session (None without a secret key).
    """

    def __init__(self, spaces: dict[str, str]):
        self.spaces = dict(spaces)

    def _space(self) -> str:
        """The prefix of the space the request is in; outside every space, the first one's (its
        cookie is never sent outside its path, so such a request opens an empty session)."""
        path = request.path
        return next((prefix for prefix in self.spaces if path == prefix or path.startswith(prefix + "/")),
                    next(iter(self.spaces)))

    def get_cookie_name(self, app) -> str:
        return self.spaces[self._space()]

    def get_cookie_path(self, app) -> str:
        return self._space()

    def open_session(self, app, request):
        if app.secret_key and ("HTTP_COOKIE" not in request.environ
                               or not request.cookies.get(self.get_cookie_name(app))):
            return self.session_class()
        return super().open_session(app, request)

    def save_session(self, app, session, response) -> None:
        """Flask's, which does nothing for a session that is empty, unchanged and unread (every
        FHIR API request) but name its cookie first."""
        if session or session.modified or session.accessed:
            super().save_session(app, session, response)
