"""The process: what starts, configures and feeds a server, nothing a request runs through.

- ``config``: the one place the environment is read (``Config``).
- ``cli``: the ``fhir-dmp`` command (serve, load, dev-token, audit ...).
- ``server``: ``fhir-dmp serve`` on granian; ``logs``: JSON log lines.
- ``database``, ``embedded_db``: the SecantusDB client, or an embedded server of its own.
- ``loader``: ``fhir-dmp load`` (bulk import as the administrator).
- ``secret_files``: keys and secrets written atomically, private to the user.
- ``services``: the typed services of one app and their background threads (start/stop).
"""
