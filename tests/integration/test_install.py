"""The library as others install it: `make install-lib` into a DESTDIR, then a program outside the
tree built with nothing but `c++ -std=c++20 app.cpp $(pkg-config --cflags --libs squall)`, run
against the installed shared library, and answering HTTP."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from squall_helpers import curl

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/usr/local"
SANITIZE = os.environ.get("SANITIZE", "")

APP = r"""
// An HTTP service outside squall's tree: one route, the port on stdout, SIGTERM stops it.
#include <csignal>
#include <cstdio>
#include <memory>

#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/http/router.hpp>
#include <squall/http/server.hpp>

int main() {
  squall::Loop loop;
  squall::http::Router router;
  router.add("GET", "/hello", [](squall::http::Request&, squall::http::Responder responder) {
    responder.send(200, "text/plain", "hello from outside\n");
  });
  squall::http::Server server(loop, std::make_shared<const squall::http::Router>(router), {});
  std::printf("%s\n", server.listen("127.0.0.1", 0).c_str());
  std::fflush(stdout);
  squall::SignalWatcher stop(loop, SIGTERM, [&] {
    server.drain(std::chrono::seconds(1), [&] { loop.stop(); });
  });
  loop.run();
  return loop.close();
}
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The library installed into a fresh DESTDIR by the Makefile, as a packager would."""
    destdir = tmp_path_factory.mktemp("destdir")
    make = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO), "install-lib",
                           f"DESTDIR={destdir}", f"PREFIX={PREFIX}", f"SANITIZE={SANITIZE}"],
                          capture_output=True, text=True, timeout=600)
    assert make.returncode == 0, make.stdout + make.stderr
    return destdir


def pkg_config(destdir: Path, *args) -> list[str]:
    env = dict(os.environ, PKG_CONFIG_PATH=str(destdir / PREFIX.lstrip("/") / "lib" / "pkgconfig"),
               PKG_CONFIG_SYSROOT_DIR=str(destdir))
    result = subprocess.run(["pkg-config", *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_install_lays_out_headers_libraries_and_pkg_config_files(installed):
    root = installed / PREFIX.lstrip("/")
    assert (root / "include/squall/http/server.hpp").is_file()
    assert (root / "include/squall/core/loop.hpp").is_file()
    # Internal headers stay out of the installed tree.
    assert not (root / "include/squall/http/connection.hpp").exists()
    assert not (root / "include/squall/http/parser.hpp").exists()
    for name in ("squall", "squall-client", "squall-jobs", "squall-mail", "squall-daemon"):
        assert (root / f"lib/lib{name}.a").is_file()
        assert (root / f"lib/pkgconfig/{name}.pc").is_file()
        real = root / f"lib/lib{name}.so.0.1.0"
        assert real.is_file()
        assert os.readlink(root / f"lib/lib{name}.so.0") == real.name
        assert os.readlink(root / f"lib/lib{name}.so") == f"lib{name}.so.0"
        dynamic = subprocess.run(["readelf", "-d", str(real)], capture_output=True, text=True)
        assert f"Library soname: [lib{name}.so.0]" in dynamic.stdout
    assert pkg_config(installed, "--modversion", "squall") == ["0.1.0"]


def needed_libraries(binary: Path) -> set[str]:
    dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True)
    return set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic.stdout))


def test_a_program_outside_the_tree_builds_with_pkg_config_and_serves(installed, tmp_path):
    app = tmp_path / "app.cpp"
    app.write_text(APP)
    flags = pkg_config(installed, "--cflags", "--libs", "squall")
    sanitize = [f"-fsanitize={SANITIZE}"] if SANITIZE else []
    compiler = shutil.which(os.environ.get("CXX", "c++")) or "c++"
    build = subprocess.run([compiler, "-std=c++20", str(app), "-o", str(tmp_path / "app"),
                            *sanitize, *flags], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    needed = needed_libraries(tmp_path / "app")
    assert "libsquall.so.0" in needed
    # An HTTP-only program links neither the job store's nor the daemon's dependencies.
    assert not any(lib.startswith(("libsqlite3", "libcurl", "libsystemd", "libcrypto"))
               for lib in needed), needed

    libdir = installed / PREFIX.lstrip("/") / "lib"
    proc = subprocess.Popen([str(tmp_path / "app")], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, LD_LIBRARY_PATH=str(libdir)))
    try:
        address = proc.stdout.readline().strip()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address), address
        # The loader took libsquall from the DESTDIR, not from anywhere else.
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert str(libdir / "libsquall.so.0.1.0") in maps
        answer = curl("-s", f"http://{address}/hello")
        assert answer.stdout == b"hello from outside\n", answer
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
