"""Privacy review cases (CONTRACT.md "Privacy operations"): the ``Task`` of each break-glass
grant, each centre 15 access and each anomaly the misuse scan finds, opened by the server
(:mod:`.cases`), taken and closed by the privacy officer (:mod:`.decide`).
"""
from .cases import ReviewCase, case_input, open_case, open_cases

__all__ = ["ReviewCase", "case_input", "open_case", "open_cases"]
