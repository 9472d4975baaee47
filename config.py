"""Every setting of the app, API, scheduler and CLI in one place (pydantic-settings, from the environment).

This class is the documented reference: each field is one environment variable, with its default
and why it exists; `.env.example` lists the same variables. Values come from the process
environment only (no implicit `.env` reading here), so what a module that reads `os.environ`
directly sees and what `load_settings()` returns can never disagree. `honcho start` and
`docker compose` load `.env` into the environment for you.

`db/session.py`, `db/crypto.py` and `services/api_keys.py` read their variables themselves, on
every call where tests and key rotation rely on that (`api.py` takes its `RRC_API_*` limits from
here); the names and defaults below are the same ones they use, and tests/test_deploy.py
checks that `.env.example` documents every field here.

Every process checks the whole configuration when it starts, before it serves anyone: the API
(`api.py`, when its app is built), the scheduler (`main`) and the CLI (its Typer callback) end with
exit code 2 and one line naming the variable (`settings_or_exit`); the Streamlit app shows the same
message and stops before preparing the database or drawing a page (`app.py`). An empty variable
counts as unset, as it does for the modules that read the environment themselves.

Decision on the services that still read a variable lazily (`services/settings.py`
RRC_SCHEDULER_MIN_INTERVAL_SECONDS, `services/source_policy.py` RRC_S3_ALLOW_SERVER_CREDENTIALS and
RRC_SQL_SOURCE_FILE_DIRS, `services/exports.py` RRC_EXPORT_URL_TTL, `services/users.py`
RRC_BCRYPT_ROUNDS): their refusals stay as they are, naming the variable, and are not reworded to a
bare "server configuration error". `Settings` refuses at start every value they refuse (whole
numbers in plain digits, yes/no words, absolute folders), and a process's environment does not change
after it started, so a tenant can no longer meet those messages; rewording them would only hide the
variable from the tests and from an operator reproducing a problem.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.endpoints import parse_private_endpoints


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the environment variable."""


class Settings(BaseSettings):
    """Environment variables of Revenue Recovery Copilot (all optional; defaults suit a laptop)."""

    model_config = SettingsConfigDict(env_prefix="RRC_", extra="ignore", case_sensitive=False,
                                      populate_by_name=True, env_ignore_empty=True)

    # --- storage -------------------------------------------------------------------------------
    database_url: str | None = Field(
        None, validation_alias="DATABASE_URL",
        description="SQLAlchemy URL of the app database. Unset: the embedded SQLite file <RRC_DATA_DIR>/rrc.db. "
                    "Production: postgresql://user:pass@host:5432/db (sent through psycopg 3).")
    data_dir: Path = Field(
        Path("data"),
        description="Folder for the embedded SQLite file, the generated secret key (SQLite only), synced "
                    "bundles (orgs/<id>/bundle) and the demo bundle.")

    # --- secrets -------------------------------------------------------------------------------
    secret_keys: str | None = Field(
        None,
        description="Comma-separated Fernet keys encrypting integration secrets at rest; the first encrypts, "
                    "all decrypt (rotation: put the new key first). Required unless the database is SQLite. "
                    "Generate one: python -c 'from cryptography.fernet import Fernet; "
                    "print(Fernet.generate_key().decode())'.")
    cookie_key: str | None = Field(
        None,
        description="Key signing the Streamlit app's sign-in cookie. Unset: a random key kept in "
                    "<RRC_DATA_DIR>/cookie.key. With several app instances or containers, set one shared long "
                    "random value so sessions survive restarts and work on every instance.")
    api_token_key: str | None = Field(
        None,
        description="Key signing the REST API's user tokens (POST /api/auth/token). Unset: derived from "
                    "RRC_SECRET_KEYS (or the embedded key file on SQLite).")
    api_token_ttl: int = Field(3600, gt=0, description="Lifetime of a REST API user token, in seconds.")
    bcrypt_rounds: int = Field(
        12, ge=4, le=16,
        description="bcrypt cost (log2 of the rounds) for new password hashes; existing hashes keep the cost they "
                    "were made with. 12 takes about a quarter of a second per sign-in here; the test suite sets 4.")

    # --- integrations ----------------------------------------------------------------------------
    sql_source_file_dirs: str = Field(
        "",
        description="Folders (separated by os.pathsep, ':' on Linux) from which an organization's SQL usage source "
                    "may read SQLite or DuckDB database files (absolute paths, symlinks resolved). Empty: such "
                    "files are refused and only database servers can be sources. The data folder and the app's "
                    "own database are refused even when listed (services/source_policy.py).")
    s3_allow_server_credentials: bool = Field(
        False,
        description="1: an organization's S3 settings (S3 Parquet usage source, and its audit-export prefix) may "
                    "leave out access_key_id/secret_access_key and then use this server's own AWS credentials "
                    "(AWS_* variables, ~/.aws, instance or task role). 0 (default): they must carry their own "
                    "keys, since the server's role could reach other organizations' and the operator's buckets. "
                    "Only for a single-tenant install whose role reaches nothing else. RRC_EXPORT_BUCKET always "
                    "uses the server's credentials (services/source_policy.py).")
    private_endpoints: str = Field(
        "",
        description="Non-public hosts that organizations' integrations may make this server connect to (Stripe "
                    "api_base, HubSpot host, Salesforce instance_url, S3 endpoint_url, SQL source host): "
                    "comma-separated IP addresses, CIDR networks (10.20.0.0/16) and host names (allowed whatever "
                    "they resolve to), or 'any' alone (single-tenant or development installs). Empty (default): "
                    "an endpoint that is, or resolves to, a loopback, private, link-local (169.254.169.254), "
                    "unique-local, multicast, reserved or this server's own address is refused; plain http is "
                    "accepted only to an allowed non-public host (services/source_policy.py).")

    # --- front doors ---------------------------------------------------------------------------
    demo: bool = Field(
        True,
        description="Seed the demo organization (users admin@demo.example / analyst@demo.example) when the app "
                    "starts on a database without any organization. 0 disables it: set 0 in production.")
    app_base_url: str = Field(
        "http://localhost:8501",
        description="Public URL of the Streamlit app; links in CRM tasks and exports point back to it.")
    api_max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body the REST API accepts (413 above).")
    api_key_rate: float = Field(
        20.0, ge=0, description="Sustained requests per second per API key (0 = no limit; 429 + Retry-After above).")
    api_key_burst: int = Field(40, ge=1, description="Requests one API key may send at once.")
    api_ip_rate: float = Field(
        50.0, ge=0, description="Sustained requests per second per client IP (0 = no limit).")
    api_ip_burst: int = Field(100, ge=1, description="Requests one client IP may send at once.")
    api_cors_origins: str = Field(
        "", description="Comma-separated origins allowed to call the REST API from a browser. Empty: CORS off.")
    api_trust_forwarded_for: bool = Field(
        False, description="Take the client IP from X-Forwarded-For (only behind a proxy you run).")
    api_log_level: str = Field("INFO", description="Log level of the API process.")
    log_level: str = Field("INFO", description="Log level of the scheduler and CLI (DEBUG, INFO, WARNING, ERROR).")

    # --- processes (Procfile / docker-compose.yml) --------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address the API listens on under honcho (Procfile).")
    api_port: int = Field(8000, gt=0, lt=65536, description="Port of the API (Procfile; host port in compose).")
    app_host: str = Field("127.0.0.1", description="Address the Streamlit app listens on under honcho (Procfile).")
    app_port: int = Field(8501, gt=0, lt=65536,
                          description="Port of the Streamlit app (Procfile; host port in compose).")

    # --- exports (audit-ready files) --------------------------------------------------------------
    export_bucket: str | None = Field(
        None,
        description="S3 bucket for audit exports, handed out as presigned URLs. Unset: the S3 integration's "
                    "export prefix if one is connected, else exports are direct downloads.")
    export_prefix: str = Field("exports", description="Key prefix of exports inside RRC_EXPORT_BUCKET.")
    export_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for RRC_EXPORT_BUCKET (MinIO, Ceph...). Unset: AWS S3.")
    export_url_ttl: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="Lifetime of an export's presigned URL, in seconds (max 7 days).")
    aws_region: str | None = Field(
        None, validation_alias="AWS_REGION",
        description="Region of RRC_EXPORT_BUCKET (AWS_DEFAULT_REGION is used too; default us-east-1). Credentials "
                    "come from boto3's usual chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile, instance role "
                    "(for this operator bucket only; organizations' S3 settings bring their own keys, see "
                    "RRC_S3_ALLOW_SERVER_CREDENTIALS).")

    # --- scheduler -----------------------------------------------------------------------------
    scheduler_poll_seconds: float = Field(
        5.0, gt=0, description="How often the scheduler looks for queued runs (Run now, API) and stale ones.")
    scheduler_settings_poll_seconds: float = Field(
        30.0, gt=0, description="How often the scheduler re-reads the schedules admins edit in Settings.")
    scheduler_heartbeat_seconds: float = Field(
        10.0, gt=0, description="How often a worker records that its running reconciliation is alive.")
    scheduler_stale_after_seconds: float = Field(
        300.0, gt=0,
        description="A running reconciliation without a heartbeat for this long is marked interrupted (its "
                    "process died) and retried. Must exceed two heartbeats.")
    scheduler_max_retries: int = Field(
        1, ge=0, description="How many times in a row an interrupted run is queued again automatically.")
    scheduler_misfire_grace_seconds: int = Field(
        86_400, gt=0,
        description="A schedule missed while no scheduler ran (downtime, deploy) still fires once if it is at "
                    "most this late; several missed fires are coalesced into one run.")
    scheduler_shutdown_grace_seconds: float = Field(
        20.0, ge=0,
        description="On SIGTERM the current run may finish for this long; after that it is marked interrupted "
                    "(and retried by the next scheduler). Keep below the stop timeout of your supervisor.")
    scheduler_min_interval_seconds: int = Field(
        300, ge=1, le=366 * 24 * 3600,
        description="Shortest gap admins may set between an organization's scheduled runs (interval or cron). "
                    "A stored schedule below it is skipped by the scheduler (logged) until it is saved again.")
    scheduler_worker_id: str | None = Field(
        None, description="Name of this scheduler process in runs' worker_id. Unset: <hostname>:<pid>:<random>.")
    sync_cron: str = Field(
        "0 3 * * *",
        description="Crontab (UTC) of the daily sync of connected sources (Stripe, SQL, S3); 'off' disables it.")

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers_in_digits(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic alone reads "300.0", "1_000" or "+5" as whole numbers, which the services reading
        their variable themselves (RRC_SCHEDULER_MIN_INTERVAL_SECONDS, RRC_EXPORT_URL_TTL) refuse: the
        start-up check must refuse at least what they do."""
        digits = value.strip() if isinstance(value, str) else None
        if cls.model_fields[info.field_name or ""].annotation is int and digits is not None \
                and not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"expected a whole number in digits, got {value!r}")
        return value

    @field_validator("sql_source_file_dirs")
    @classmethod
    def _absolute_folders(cls, value: str) -> str:
        """A relative folder would mean a different place to each process (their working directories)."""
        folders = [part.strip() for part in value.split(os.pathsep) if part.strip()]
        relative = next((folder for folder in folders if not Path(folder).expanduser().is_absolute()), None)
        if relative is not None:
            raise ValueError(f"folders are given by their absolute path, not {relative!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.scheduler_stale_after_seconds <= 2 * self.scheduler_heartbeat_seconds:
            raise ValueError("RRC_SCHEDULER_STALE_AFTER_SECONDS must be more than twice "
                             "RRC_SCHEDULER_HEARTBEAT_SECONDS, or live runs would be taken for dead ones")
        if self.sync_cron.strip().lower() != "off":
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(self.sync_cron, timezone="UTC")
            except ValueError as exc:
                raise ValueError(f"RRC_SYNC_CRON: {exc} (expected a crontab like '0 3 * * *' or 'off')") from None
        parse_private_endpoints(self.private_endpoints)  # its ValueError names RRC_PRIVATE_ENDPOINTS
        for name, level in (("RRC_LOG_LEVEL", self.log_level), ("RRC_API_LOG_LEVEL", self.api_log_level)):
            if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
                raise ValueError(f"{name}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return self

    @property
    def sync_enabled(self) -> bool:
        return self.sync_cron.strip().lower() != "off"


def env_name(field: str) -> str:
    """The environment variable behind a field (DATABASE_URL has no RRC_ prefix)."""
    info = Settings.model_fields[field]
    alias = info.validation_alias
    return alias if isinstance(alias, str) else f"RRC_{field.upper()}"


def load_settings() -> Settings:
    """Read the environment now (not cached: tests and key rotation change it); bad values name their variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = error.get("loc") or ()
            field = str(where[0]) if where else ""
            name = env_name(field) if field in Settings.model_fields else ""
            message = str(error.get("msg", "")).removeprefix("Value error, ")
            problems.append(f"{name}: {message}" if name else message)
        raise ConfigError("; ".join(problems)) from None


EXIT_CONFIG = 2


def settings_or_exit() -> Settings:
    """For a process starting up (API, scheduler, CLI): the settings, or exit code 2 with one line on
    stderr naming the variable, so a bad value stops the process instead of reaching a tenant later."""
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
