"""`condo validate` and `condo run`'s usage errors, run as users run them: a real process, real
files, exit codes and output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import condo
from condo import cli, logs
from condo.config import Config
from tests.cli_support import stand_in_condo

GOOD = '{:spec {:Image "localhost:5000/app:1"}\n :deploy [:After 5]}\n'
BAD = '{:spec {:Image "app:1"}\n :deplyo [:Before]}\n'


def condo_command(
    *args: str, cwd: Path, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONDO_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "condo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def specs(tmp_path: Path) -> Path:
    (tmp_path / "web.edn").write_text(GOOD)
    (tmp_path / "typo.edn").write_text(BAD)
    (tmp_path / "empty.edn").write_text("")
    (tmp_path / "self.edn").write_text('{:Image "localhost:5000/condo:1" :Name "condo-1"}')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "self.edn").write_text('{:spec {:Image "localhost:5000/condo:1"}}')
    return tmp_path


def test_valid_file(specs: Path) -> None:
    result = condo_command("validate", "web.edn", cwd=specs)
    assert result.returncode == 0
    assert result.stdout == "web.edn: ok\n"
    assert result.stderr == ""


def test_invalid_file(specs: Path) -> None:
    result = condo_command("validate", "typo.edn", cwd=specs)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "typo.edn:2: unknown key :deplyo (did you mean :deploy?); the keys are :spec, :deploy,"
        " :health-timeout, :stop-timeout, :stable-after, :pull, :on-failure, :probation,"
        " :proxy\n"
    )


def test_validate_warns_of_after_with_a_fixed_host_port(tmp_path: Path) -> None:
    (tmp_path / "web.edn").write_text(
        '{:spec {:Image "web:1" :HostConfig {:PortBindings {"80/tcp" [{:HostPort "8080"}]}}}\n'
        " :deploy [:After 5]}"
    )
    result = condo_command("validate", "web.edn", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == "web.edn: ok\n"
    assert result.stderr.startswith("web.edn: warning: [:After n] starts the new container")
    assert "use :proxy" in result.stderr


def test_validate_refuses_two_files_sharing_a_listen_address(tmp_path: Path) -> None:
    (tmp_path / "a.edn").write_text('{:spec {:Image "a"}\n :proxy [{:listen "8080" :port 80}]}')
    (tmp_path / "b.edn").write_text('{:spec {:Image "b"} :proxy [{:listen "8081" :port 80}]}')
    (tmp_path / "c.edn").write_text(
        '{:spec {:Image "c"}\n :proxy [{:listen "9000" :port 80}\n'
        ' {:listen "127.0.0.1:8080" :port 80}]}'
    )
    result = condo_command("validate", "a.edn", "b.edn", "c.edn", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == "b.edn: ok\n"
    assert result.stderr.splitlines() == [
        "a.edn:2: :proxy :listen 8080 is also a listener in c.edn: a listen address belongs to"
        " one service",
        "c.edn:3: :proxy :listen 127.0.0.1:8080 is also a listener in a.edn: a listen address"
        " belongs to one service",
    ]


def test_mixed_files_report_each_and_fail(specs: Path) -> None:
    result = condo_command(
        "validate", "./web.edn", "typo.edn", "empty.edn", "self.edn", "missing.edn", cwd=specs
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["./web.edn: ok", "self.edn: ok"]
    assert result.stderr.splitlines() == [
        "typo.edn:2: unknown key :deplyo (did you mean :deploy?); the keys are :spec, :deploy,"
        " :health-timeout, :stop-timeout, :stable-after, :pull, :on-failure, :probation,"
        " :proxy",
        "empty.edn: the file is empty",
        "missing.edn: cannot read the file: No such file or directory",
    ]


def test_self_edn_is_a_bare_container_spec(specs: Path) -> None:
    # A service spec (with the :spec wrapper) is wrong for self.edn, and says why.
    result = condo_command("validate", "sub/self.edn", cwd=specs)
    assert result.returncode == 1
    assert result.stderr.startswith("sub/self.edn:1: self.edn is a bare create-container body")


def test_directory_and_absolute_paths(specs: Path) -> None:
    result = condo_command("validate", str(specs / "web.edn"), str(specs / "sub"), cwd=specs)
    assert result.returncode == 1
    assert result.stdout == f"{specs / 'web.edn'}: ok\n"
    assert result.stderr == f"{specs / 'sub'}: is a directory, not a spec file\n"


def test_binary_file(specs: Path) -> None:
    (specs / "junk.edn").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00")
    result = condo_command("validate", "junk.edn", cwd=specs)
    assert result.returncode == 1
    assert result.stderr == "junk.edn:1: the file contains a NUL byte: binary data, not a spec\n"


def test_no_files_is_a_usage_error(specs: Path) -> None:
    result = condo_command("validate", cwd=specs)
    assert result.returncode == 2
    assert "requires an argument" in result.stderr


def test_version(tmp_path: Path) -> None:
    result = condo_command("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == condo.__version__


def test_console_script(specs: Path) -> None:
    # The installed `condo` entry point (pyproject's condo.cli:main) is the same command.
    script = Path(sys.executable).parent / "condo"
    result = subprocess.run(
        [str(script), "validate", "web.edn", "typo.edn"],
        cwd=specs,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == "web.edn: ok\n"
    assert result.stderr.startswith("typo.edn:2: unknown key :deplyo")


# A usage error stops `condo run` before it binds, connects or touches anything (an engine that
# is not there proves it: had condo started, it would keep trying until the subprocess timeout).
NO_ENGINE = ("--server", "off", "--docker", "unix:///nonexistent/docker.sock")


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--api-token", ""), {}),
        (("--api-token", "  "), {}),
        ((), {"CONDO_API_TOKEN": ""}),
        ((), {"CONDO_API_TOKEN": " \t"}),
    ],
)
def test_an_empty_api_token_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    result = condo_command("run", str(tmp_path), *NO_ENGINE, *args, cwd=tmp_path, env_extra=env)
    assert result.returncode == 2
    assert "condo: --api-token is empty" in result.stderr


def test_a_token_with_blanks_around_it_is_a_usage_error(tmp_path: Path) -> None:
    # HTTP clients' tokens arrive stripped: it would open the feed but never HTTP.
    result = condo_command("run", str(tmp_path), *NO_ENGINE, "--api-token", " T0k", cwd=tmp_path)
    assert result.returncode == 2
    assert "blanks" in result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--allowed-host", "ci.example:4280"), {}),
        (("--allowed-host", "ok.example", "--allowed-host", "http://ci.example"), {}),
        ((), {"CONDO_ALLOWED_HOST": "ok.example, ci.example:80"}),
        (("--max-waits", "-1"), {}),
    ],
)
def test_bad_exposure_options_are_usage_errors(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    result = condo_command("run", str(tmp_path), *NO_ENGINE, *args, cwd=tmp_path, env_extra=env)
    assert result.returncode == 2
    assert "condo: --" in result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--notify", "ftp://hooks.example/SECRET-PATH"), {}),
        (("--notify", "hooks.example/SECRET-PATH"), {}),
        (("--notify", "http://hooks.example/a SECRET-PATH"), {}),
        ((), {"CONDO_NOTIFY": "http://ok.example/hook, http://:80/SECRET-PATH"}),
    ],
)
def test_a_notify_url_that_is_not_absolute_http_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    result = condo_command("run", str(tmp_path), *NO_ENGINE, *args, cwd=tmp_path, env_extra=env)
    assert result.returncode == 2
    assert "condo: --notify: expected an absolute http:// or https:// URL" in result.stderr
    # A webhook's path is often its secret: never echoed.
    assert "SECRET" not in result.stderr + result.stdout


def test_condo_notify_is_a_comma_separated_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Config] = []

    async def serve(config: Config) -> None:
        seen.append(config)

    monkeypatch.setattr(cli, "serve", serve)
    # Process-wide set-up that the real command does first: not in the test process.
    monkeypatch.setattr(logs, "configure", lambda _format: None)
    monkeypatch.setattr(cli, "raise_fd_limit", lambda: (1024, 1024))
    monkeypatch.setenv("CONDO_NOTIFY", "https://hooks.example/a/b , http://127.0.0.1:9/x")
    with pytest.raises(SystemExit) as exited:
        cli.build_app()(["run", str(tmp_path), "--server", "off", "--log-format", "json"])
    assert exited.value.code == 0
    [config] = seen
    assert config.notify_urls == ("https://hooks.example/a/b", "http://127.0.0.1:9/x")
    assert "hooks.example" not in repr(config)


@pytest.mark.parametrize(
    ("status", "answer", "code", "said"),
    [
        (200, {"status": "ok", "hosts": ["h1"]}, 0, "web is Stable on web:2 on 1 host(s)"),
        (500, {"status": "timeout", "pending": {"h1": {"state": "Wait"}}}, 1, "pending: h1=Wait"),
    ],
)
def test_condo_wait_exits_with_its_verdict_and_all_its_output(
    status: int, answer: dict[str, object], code: int, said: str
) -> None:
    """`condo wait` leaves without tearing the interpreter down (os._exit, for CI's sake): its
    exit code and every line it printed still come out."""

    with stand_in_condo(status, answer) as url:
        argv = [sys.executable, "-m", "condo", "wait", "--name", "web", "--image", "web:2"]
        done = subprocess.run(
            [*argv, "--url", url, "--timeout", "5"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == code
    assert said in done.stdout + done.stderr


def test_validate_warns_when_the_proxy_sockets_path_is_too_long(tmp_path: Path) -> None:
    (tmp_path / "web.edn").write_text('{:spec {:Image "w"} :proxy [{:listen "8080" :port 80}]}')
    (tmp_path / "plain.edn").write_text('{:spec {:Image "p"}}')
    deep = tmp_path / ("d" * 100) / "state.json"
    result = condo_command("validate", "web.edn", "plain.edn", "--state", str(deep), cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == "web.edn: ok\nplain.edn: ok\n"
    assert result.stderr.startswith(
        f"web.edn: warning: :proxy cannot run: the proxy's socket path {deep}.proxy/master.sock"
    )
    assert "plain.edn" not in result.stderr  # no :proxy, no sockets
    short = condo_command("validate", "web.edn", "--state", "s.json", cwd=tmp_path)
    assert short.stderr == ""
