"""Running it for real: configuration reference, compose/Docker/Procfile, and the stack under honcho."""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml
from cryptography.fernet import Fernet

import config
from core.demo import generate_demo_bundle
from db.models import ReconRun
from db.session import data_dir, system_session
from services import api_keys, demo, exports, settings, users
from services.context import Actor
from tests.fakes.serving import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE_ONLY = {"POSTGRES_PASSWORD"}


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo bundle (every anomaly type) shared by the module's tests."""
    folder = tmp_path_factory.mktemp("bundle") / "demo"
    generate_demo_bundle(folder, accounts=6, seed=3)
    return folder


def documented() -> dict[str, str]:
    """VAR -> default shown in .env.example (commented or not)."""
    text = (ROOT / ".env.example").read_text()
    return dict(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=(.*)$", text, re.M))


def test_env_example_documents_exactly_the_settings() -> None:
    expected = {config.env_name(name) for name in config.Settings.model_fields}
    assert set(documented()) - COMPOSE_ONLY == expected
    for name, info in config.Settings.model_fields.items():
        assert info.description, f"{config.env_name(name)} needs a description"


def test_env_example_defaults_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in documented().items():
        monkeypatch.delenv(name, raising=False)
        if value:
            monkeypatch.setenv(name, value)
    loaded = config.load_settings()
    assert loaded == config.Settings.model_validate({})  # the file shows the real defaults


def _env_names_read_by_code() -> set[str]:
    """Every RRC_* / DATABASE_URL name the code reads with os.environ (the API's RRC_API_* are config fields)."""
    names: set[str] = set()
    files = [*ROOT.glob("*.py"), *(ROOT / "services").glob("*.py"), *(ROOT / "db").glob("*.py"),
             *(ROOT / "core").glob("*.py"), *(ROOT / "connectors").glob("*.py"), *(ROOT / "pages").glob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"RRC_[A-Z0-9_]*[A-Z0-9]|DATABASE_URL", node.value):
                names.add(node.value)
    return names


def test_every_variable_the_code_reads_is_documented() -> None:
    missing = _env_names_read_by_code() - set(documented())
    assert not missing, f"add to config.Settings and .env.example: {sorted(missing)}"


@pytest.mark.parametrize(("name", "value"), [
    ("RRC_SCHEDULER_MIN_INTERVAL_SECONDS", "300.0"),  # services/settings.py refuses what pydantic alone took
    ("RRC_EXPORT_URL_TTL", "1_000"),
    ("RRC_S3_ALLOW_SERVER_CREDENTIALS", "maybe"),
    ("RRC_SQL_SOURCE_FILE_DIRS", f"/srv/usage{os.pathsep}usage"),  # relative: each process its own folder
    ("RRC_BCRYPT_ROUNDS", "40"),
])
def test_operator_settings_read_lazily_are_checked_with_the_rest(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                  value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError, match=f"^{name}: "):
        config.load_settings()


def test_an_empty_variable_means_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """As for the modules reading the environment themselves: `RRC_X=` in .env is no start-up error."""
    for name in ("RRC_SCHEDULER_MIN_INTERVAL_SECONDS", "RRC_S3_ALLOW_SERVER_CREDENTIALS", "RRC_BCRYPT_ROUNDS"):
        monkeypatch.setenv(name, "")
    loaded = config.load_settings()
    assert (loaded.scheduler_min_interval_seconds, loaded.s3_allow_server_credentials, loaded.bcrypt_rounds) \
        == (settings.min_interval_seconds(), False, 12)


def test_the_modules_reading_a_variable_themselves_agree_with_the_settings(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """An empty or unusual value means the same to config.Settings and to the code that acts on it."""
    monkeypatch.chdir(tmp_path)
    for name in ("RRC_DATA_DIR", "RRC_EXPORT_PREFIX"):
        monkeypatch.setenv(name, "")
    loaded = config.load_settings()
    assert data_dir().resolve() == (tmp_path / loaded.data_dir).resolve()
    monkeypatch.setenv("RRC_EXPORT_BUCKET", "operator-exports")
    operator_bucket = exports._target(Actor.system(1, "test"))  # the operator's bucket: no org setting is read
    assert operator_bucket is not None and operator_bucket.prefix == loaded.export_prefix == "exports"
    monkeypatch.setenv("RRC_API_TOKEN_TTL", " 300")
    assert api_keys._token_ttl() == config.load_settings().api_token_ttl == 300
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'rrc.db'}")
    monkeypatch.setenv("RRC_DEMO", "false")
    assert not config.load_settings().demo
    assert demo.prepare_first_start() is False and not users.any_organization()


@pytest.mark.parametrize(("command", "name", "value"), [
    (["scheduler.py"], "RRC_SQL_SOURCE_FILE_DIRS", "usage-files"),
    (["cli.py", "db", "upgrade"], "RRC_SCHEDULER_MIN_INTERVAL_SECONDS", "300.0"),
    (["-m", "uvicorn", "api:app", "--port", "0"], "RRC_S3_ALLOW_SERVER_CREDENTIALS", "maybe"),
])
def test_each_process_refuses_to_start_on_a_bad_setting_naming_it(tmp_path: Path, command: list[str], name: str,
                                                                   value: str) -> None:
    """Before serving anyone or touching the database: exit 2 and one line naming the variable."""
    env = {**os.environ, "RRC_DATA_DIR": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path / 'rrc.db'}",
           name: value}
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == config.EXIT_CONFIG, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"configuration error: {name}: ")
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())  # no database file was made


def test_compose_runs_app_api_scheduler_against_postgres() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "migrate", "app", "api", "scheduler"} <= set(services)
    commands = {name: " ".join(services[name]["command"]) for name in ("migrate", "app", "api", "scheduler")}
    assert "streamlit run app.py" in commands["app"]
    assert "uvicorn api:app" in commands["api"]
    assert commands["scheduler"] == "python scheduler.py"
    assert commands["migrate"] == "python cli.py db prepare"
    for name in ("app", "api", "scheduler"):
        service = services[name]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "appdata:/app/data" in service["volumes"]
    grace = int(services["scheduler"]["stop_grace_period"].rstrip("s"))
    assert grace > config.Settings.model_fields["scheduler_shutdown_grace_seconds"].default
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])
    assert "/_stcore/health" in " ".join(services["app"]["healthcheck"]["test"])


def test_dockerfile_copies_every_part_of_the_application() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = {word.rstrip("/") for line in dockerfile.splitlines() if line.startswith("COPY")
              for word in line.split()[1:-1]}
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    modules = {p.name for p in ROOT.glob("*.py")}
    assert packages | modules | {"alembic.ini", ".streamlit", "requirements.txt"} <= copied
    assert "USER rrc" in dockerfile, "the processes must not run as root"


def test_procfile_starts_the_three_processes() -> None:
    entries = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(entries) == {"api", "app", "scheduler"}
    assert "cli.py db prepare &&" in entries["api"] and "uvicorn api:app" in entries["api"]
    assert "streamlit run app.py" in entries["app"] and "scheduler.py" in entries["scheduler"]



def poll(url: str, timeout: float, log: Path) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready after {timeout} s ({last}); honcho log:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
@pytest.mark.postgres
def test_honcho_starts_the_stack_and_a_scheduled_run_happens(fresh_pg_url: str, demo_bundle: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api_port, app_port = free_port(), free_port()
    env = {
        **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DATABASE_URL": fresh_pg_url, "RRC_SECRET_KEYS": Fernet.generate_key().decode(),
        "RRC_DATA_DIR": str(tmp_path / "data"), "RRC_DEMO": "0",
        "RRC_API_PORT": str(api_port), "RRC_APP_PORT": str(app_port),
        "RRC_SCHEDULER_POLL_SECONDS": "0.5", "RRC_SCHEDULER_SETTINGS_POLL_SECONDS": "1", "RRC_SYNC_CRON": "off",
        "RRC_SCHEDULER_MIN_INTERVAL_SECONDS": "1",  # the 3 s schedule below, for the test only
    }
    (tmp_path / "data").mkdir()
    (tmp_path / "empty.env").write_text("")
    log = tmp_path / "honcho.log"
    with open(log, "wb") as out:
        honcho = subprocess.Popen(
            [str(BIN / "honcho"), "start", "--no-colour", "-f", str(ROOT / "Procfile"), "-d", str(ROOT),
             "-e", str(tmp_path / "empty.env")],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert poll(f"http://127.0.0.1:{api_port}/ready", 90, log).json()["status"] == "ready"
        # an admin sets a schedule in the freshly migrated database the stack created
        for name in ("DATABASE_URL", "RRC_SECRET_KEYS", "RRC_DATA_DIR", "RRC_SCHEDULER_MIN_INTERVAL_SECONDS"):
            monkeypatch.setenv(name, env[name])
        org, admin = users.create_organization("Acme", "acme", "admin@acme.example", "Ann", "password-1")
        actor = Actor.user(org.id, admin.id, "admin")
        settings.set_data_source(actor, {"kind": "bundle", "path": str(demo_bundle)})
        settings.update_schedule(actor, "interval", "3", "UTC")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with system_session() as session:
                done = session.scalars(sa.select(ReconRun).where(
                    ReconRun.org_id == org.id, ReconRun.trigger == "schedule", ReconRun.status == "succeeded")).first()
            if done:
                break
            time.sleep(0.5)
        assert done, f"no scheduled run; honcho log:\n{log.read_text()[-4000:]}"
        assert done.counts and done.counts["anomalies"] > 0
        assert poll(f"http://127.0.0.1:{app_port}/_stcore/health", 90, log).text == "ok"
        assert httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=5).json()["status"] == "ok"
    finally:
        if honcho.poll() is None:
            honcho.send_signal(signal.SIGTERM)  # honcho passes it on to the three processes
            try:
                honcho.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(honcho.pid, signal.SIGKILL)
                honcho.wait(10)
    output = log.read_text()
    assert "scheduler.stopped" in output, output[-4000:]
    for port in (api_port, app_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served after shutdown"
