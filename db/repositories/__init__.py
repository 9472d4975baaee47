"""Org-scoped repositories: the queries services need, each taking (session, org_id, ...).

Every function filters by `org_id` itself, even inside an `org_session` that already scopes ORM
queries (db/tenancy.py) and on PostgreSQL row-level security: three independent layers. The few
functions that must work across orgs (the scheduler finding queued runs, the ingest API finding
the org of an API key, re-encrypting all secrets) say so in their name and docstring and expect a
`system_session`.

Repositories never commit: the caller's session context (org_session/system_session) commits
once, so a service's change and its audit entry land together or not at all.
"""
