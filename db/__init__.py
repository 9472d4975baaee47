"""App database layer (already implemented and tested: models.py, session.py, crypto.py, migrations 0001-0002).

Engineers picking up db/ work: extend these modules; do not replace them — services, the CLI and the
tests depend on their current API (org_session/system_session/upgrade/is_current, the model classes).
"""
