"""Application services (implemented: context, errors, audit, users, settings, reconciliation, demo).

Extend these modules rather than rewriting them: the CLI and tests depend on their API.
"""
