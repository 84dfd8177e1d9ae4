"""Fixtures for squalld's integration tests. See squall_helpers.py for the harness itself."""

import os
import resource
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_helpers import PrivateServer, drop_schema, new_schema  # noqa: E402
from squall_helpers import Squalld  # noqa: E402


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


# In the test process, and so in every squalld it starts (children inherit the limit).
_raise_nofile()

_running: list = []


class ServerFactory:
    """Starts servers for one test or module and stops them all at teardown (exit code 0 and no
    ERROR lines unless a test already stopped one itself)."""

    def __init__(self, base: Path):
        self.base = base
        self.servers = []

    def __call__(self, config=None, args=(), start=True, listeners=1, **kwargs) -> Squalld:
        name = f"squalld-{len(self.servers) + 1}"
        server = Squalld(self.base / name, config=config, args=args, name=name, **kwargs)
        self.servers.append(server)
        _running.append(server)
        if start:
            server.start(listeners=listeners)
        return server

    def stop_all(self):
        errors = []
        for server in self.servers:
            try:
                if server.proc is not None and server.returncode is None:
                    server.stop()
            except AssertionError as e:
                errors.append(str(e))
            finally:
                server.kill()
                if server in _running:
                    _running.remove(server)
        if errors:
            pytest.fail("\n\n".join(errors), pytrace=False)


@pytest.fixture
def squalld(tmp_path):
    """A factory: squalld(config={...}, args=[...]) -> a started Squalld, stopped at teardown."""
    factory = ServerFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def pg_server():
    """The URL of a private PostgreSQL server: the one `make integration` started
    (scripts/pg-test-server sets SQUALL_TEST_PG_URL), or one started here for the session."""
    url = os.environ.get("SQUALL_TEST_PG_URL")
    if url:
        yield url
        return
    server = PrivateServer()
    yield server.url
    server.remove()


@pytest.fixture
def pg_store(pg_server):
    """A fresh, empty PostgreSQL job store: a schema of its own in the test server's database.
    Name it before `squalld` in a test's parameters, so the nodes stop before the schema goes."""
    schema, url = new_schema(pg_server)
    yield url
    drop_schema(pg_server, schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def job_store(request, tmp_path):
    """[jobs] store for tests that hold both stores to the same behaviour: a SQLite file in the
    test's directory, or a fresh PostgreSQL schema. Name it before `squalld`."""
    if request.param == "sqlite":
        yield str(tmp_path / "jobs.db")
        return
    server = request.getfixturevalue("pg_server")
    schema, url = new_schema(server)
    yield url
    drop_schema(server, schema)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_job_store(request, tmp_path_factory):
    """job_store for a module's shared servers."""
    if request.param == "sqlite":
        yield str(tmp_path_factory.mktemp("store") / "jobs.db")
        return
    server = request.getfixturevalue("pg_server")
    schema, url = new_schema(server)
    yield url
    drop_schema(server, schema)


@pytest.fixture(scope="module")
def module_squalld(tmp_path_factory):
    """A module-wide factory, for modules that share servers."""
    factory = ServerFactory(tmp_path_factory.mktemp("srv"))
    yield factory
    factory.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in list(_running):
            if server.proc is not None:
                report.sections.append((f"{server.name} stderr", server.stderr_text()))
