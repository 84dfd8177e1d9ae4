"""A private PostgreSQL server for the integration tests (scripts/pg-test-server) and a few
helpers around it; the fixtures (pg_server, job_store, ...) are in conftest.py."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from squall_helpers import REPO

PG_SERVER = str(REPO / "scripts" / "pg-test-server")


class PrivateServer:
    """A PostgreSQL server of scripts/pg-test-server in a new directory under /tmp (pytest's own
    directories are private to root; the server runs as the postgres user)."""

    def __init__(self):
        self.directory = Path(f"/tmp/squall-pg-{secrets.token_hex(6)}")
        self.url = subprocess.run(["sh", PG_SERVER, "start", str(self.directory)], check=True,
                                  capture_output=True, text=True).stdout.strip()

    def stop(self):
        subprocess.run(["sh", PG_SERVER, "stop", str(self.directory)], check=False,
                       capture_output=True)

    def start_again(self):
        """Starts the stopped server again on the same port and socket directory."""
        port = (self.directory / "port").read_text().strip()
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        owner = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        subprocess.run(owner + [str(bindir / "pg_ctl"), "-D", str(self.directory / "data"), "-l",
                                str(self.directory / "server.log"), "-w", "-o",
                                f"-c listen_addresses=127.0.0.1 -p {port} -k {self.directory}",
                                "start"], check=True, capture_output=True)

    def remove(self):
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def psql(url: str, sql: str) -> str:
    result = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", url, "-c",
                             sql], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def with_schema(url: str, schema: str) -> str:
    return url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}"


def new_schema(url: str) -> tuple[str, str]:
    """Creates an empty schema in the server's database: (its name, the URL that uses it)."""
    schema = "squall_it_" + secrets.token_hex(6)
    psql(url, f"CREATE SCHEMA {schema}")
    return schema, with_schema(url, schema)


def drop_schema(url: str, schema: str):
    psql(url, f"DROP SCHEMA {schema} CASCADE")
