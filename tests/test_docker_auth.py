"""RegistryAuth: the docker-py resolution rules, real config files and real helper executables."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio

from condo.docker.auth import INDEX_URL, Credentials, RegistryAuth, registry_of
from condo.errors import ConfigError, DockerError


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def decode_header(header: str | None) -> dict[str, Any]:
    assert header is not None
    decoded = json.loads(base64.urlsafe_b64decode(header))
    assert isinstance(decoded, dict)
    return decoded


def write_config(directory: Path, config: Any) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


class MakeHelper(Protocol):
    def __call__(self, name: str, answer: str, exit_code: int = 0) -> Path: ...


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MakeHelper:
    """Write a real `docker-credential-NAME` executable on PATH; it records what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def make(name: str, answer: str, exit_code: int = 0) -> Path:
        asked = tmp_path / f"{name}.asked"
        script = bin_dir / f"docker-credential-{name}"
        script.write_text(
            "#!/bin/sh\n"
            '[ "$1" = get ] || exit 9\n'
            f'cat >>"{asked}"; echo >>"{asked}"\n'
            f"printf '%s' '{answer}'\n"
            f"exit {exit_code}\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        return asked

    return make


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("someapp", "docker.io"),
        ("someapp:1", "docker.io"),
        ("library/busybox:1", "docker.io"),
        ("someone/app@sha256:" + "0" * 64, "docker.io"),
        ("index.docker.io/library/busybox", "docker.io"),
        ("localhost/app", "localhost"),
        ("localhost:5000/condo-test/busybox:1", "localhost:5000"),
        ("ghcr.io/org/app:2", "ghcr.io"),
        ("registry:5000/app", "registry:5000"),
        ("localhost", "docker.io"),  # a single segment is always a Docker Hub repository
    ],
)
def test_registry_of_image(image: str, registry: str) -> None:
    assert registry_of(image) == registry


CONFIG = {
    "auths": {
        "localhost:5001": {"auth": b64("condo:pa:ss:word")},  # split on the FIRST colon
        "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")},
        "https://legacy.example.com/v1/": {"auth": b64("old:timer")},
        "http://plain.example.com": {"auth": b64("plain:text")},
        "token.example.com": {"identitytoken": "tok-123"},
        "fields.example.com": {"username": "alice", "password": "wonderland"},
        "store.example.com": {},
    }
}


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (
            "localhost:5001/condo-test/private:1",
            {"username": "condo", "password": "pa:ss:word", "serveraddress": "localhost:5001"},
        ),
        (
            "someapp:1",
            {"username": "hubuser", "password": "hubpass", "serveraddress": INDEX_URL},
        ),
        (
            "index.docker.io/library/busybox:1",
            {"username": "hubuser", "password": "hubpass", "serveraddress": INDEX_URL},
        ),
        (
            "legacy.example.com/app:1",
            {
                "username": "old",
                "password": "timer",
                "serveraddress": "https://legacy.example.com/v1/",
            },
        ),
        (
            "plain.example.com/app",
            {"username": "plain", "password": "text", "serveraddress": "http://plain.example.com"},
        ),
        (
            "token.example.com/app:1",
            {"identitytoken": "tok-123", "serveraddress": "token.example.com"},
        ),
        (
            "fields.example.com/app:1",
            {"username": "alice", "password": "wonderland", "serveraddress": "fields.example.com"},
        ),
    ],
)
async def test_auths_resolution(tmp_path: Path, image: str, expected: dict[str, str]) -> None:
    auth = RegistryAuth.load(write_config(tmp_path, CONFIG))
    with trio.fail_after(5):
        assert decode_header(await auth.header_for(image)) == expected


@pytest.mark.parametrize(
    "image",
    [
        "store.example.com/app:1",  # an empty entry: credentials live in a store, none here
        "elsewhere.example.com/app:1",  # no entry at all
        "localhost:5002/app:1",  # another port is another registry
    ],
)
async def test_auths_without_credentials_is_anonymous(tmp_path: Path, image: str) -> None:
    auth = RegistryAuth.load(write_config(tmp_path, CONFIG))
    with trio.fail_after(5):
        assert await auth.header_for(image) is None


async def test_missing_file_is_anonymous(tmp_path: Path) -> None:
    auth = RegistryAuth.load(tmp_path / "nope" / "config.json")
    with trio.fail_after(5):
        assert await auth.header_for("localhost:5001/condo-test/private:1") is None


async def test_default_path_is_docker_config_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_env = tmp_path / "env"
    in_home = tmp_path / "home" / ".docker"
    in_env.mkdir()
    in_home.mkdir(parents=True)
    write_config(in_env, {"auths": {"r.example.com": {"auth": b64("from:env")}}})
    write_config(in_home, {"auths": {"r.example.com": {"auth": b64("from:home")}}})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with trio.fail_after(5):
        monkeypatch.setenv("DOCKER_CONFIG", str(in_env))
        from_env = decode_header(await RegistryAuth.load(None).header_for("r.example.com/a"))
        monkeypatch.delenv("DOCKER_CONFIG")
        from_home = decode_header(await RegistryAuth.load(None).header_for("r.example.com/a"))
    assert (from_env["username"], from_env["password"]) == ("from", "env")
    assert (from_home["username"], from_home["password"]) == ("from", "home")


async def test_cred_helper_is_asked_first(tmp_path: Path, helper: MakeHelper) -> None:
    asked = helper(
        "condotest",
        '{"ServerURL":"localhost:5001","Username":"condo","Secret":"from-helper"}',
    )
    config = {
        "credHelpers": {"localhost:5001": "condotest"},
        "auths": {"localhost:5001": {"auth": b64("condo:from-auths")}},
    }
    auth = RegistryAuth.load(write_config(tmp_path, config))
    with trio.fail_after(10):
        header = decode_header(await auth.header_for("localhost:5001/condo-test/private:1"))
    assert header == {
        "username": "condo",
        "password": "from-helper",
        "serveraddress": "localhost:5001",
    }
    assert asked.read_text() == "localhost:5001\n"  # the server URL on stdin, nothing else


async def test_cred_helper_token_username_means_identity_token(
    tmp_path: Path, helper: MakeHelper
) -> None:
    helper("condotest", '{"ServerURL":"r.example.com","Username":"<token>","Secret":"tok-9"}')
    auth = RegistryAuth.load(
        write_config(tmp_path, {"credHelpers": {"r.example.com": "condotest"}})
    )
    with trio.fail_after(10):
        header = decode_header(await auth.header_for("r.example.com/app:1"))
    assert header == {"identitytoken": "tok-9", "serveraddress": "r.example.com"}


@pytest.mark.parametrize(
    ("answer", "exit_code"),
    [
        ("credentials not found in native keychain", 1),
        ('{"ServerURL":"","Username":"","Secret":""}', 0),
    ],
)
async def test_cred_helper_not_found_falls_through_to_auths(
    tmp_path: Path, helper: MakeHelper, answer: str, exit_code: int
) -> None:
    helper("condotest", answer, exit_code)
    config = {
        "credHelpers": {"localhost:5001": "condotest"},
        "auths": {"localhost:5001": {"auth": b64("condo:from-auths")}},
    }
    auth = RegistryAuth.load(write_config(tmp_path, config))
    with trio.fail_after(10):
        header = decode_header(await auth.header_for("localhost:5001/x:1"))
    assert header["password"] == "from-auths"


async def test_creds_store_serves_every_registry_and_hub_by_its_url(
    tmp_path: Path, helper: MakeHelper
) -> None:
    asked = helper("condostore", '{"ServerURL":"x","Username":"u","Secret":"s"}')
    other = helper("condohelper", '{"ServerURL":"x","Username":"h","Secret":"hs"}')
    config = {"credsStore": "condostore", "credHelpers": {"special.example.com": "condohelper"}}
    auth = RegistryAuth.load(write_config(tmp_path, config))
    with trio.fail_after(10):
        hub = decode_header(await auth.header_for("someapp:1"))
        private = decode_header(await auth.header_for("localhost:5001/x:1"))
        special = decode_header(await auth.header_for("special.example.com/x:1"))
    assert (hub["username"], hub["serveraddress"]) == ("u", INDEX_URL)
    assert (private["username"], private["serveraddress"]) == ("u", "localhost:5001")
    assert (special["username"], special["password"]) == ("h", "hs")
    assert asked.read_text().splitlines() == [INDEX_URL, "localhost:5001"]
    assert other.read_text().splitlines() == ["special.example.com"]


async def test_cred_helper_missing_or_failing_is_a_docker_error(
    tmp_path: Path, helper: MakeHelper
) -> None:
    helper("broken", "keychain is locked", exit_code=2)
    config = {"credHelpers": {"a.example.com": "nonexistent-helper", "b.example.com": "broken"}}
    auth = RegistryAuth.load(write_config(tmp_path, config))
    with trio.fail_after(10):
        with pytest.raises(DockerError, match="docker-credential-nonexistent-helper") as missing:
            await auth.header_for("a.example.com/x:1")
        with pytest.raises(DockerError, match="keychain is locked") as failing:
            await auth.header_for("b.example.com/x:1")
    assert missing.value.transient
    assert failing.value.transient


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"auths": {"r.example.com": {"auth": "aHVudGVyMjpodW50ZXIy"', "not valid JSON"),
        ('["hunter2"]', "not a Docker config file"),
        ('{"auths": {"r.example.com": {"auth": "hunter2!!"}}}', "is not base64"),
        ('{"auths": {"r.example.com": {"auth": "aHVudGVyMg=="}}}', "user:password"),
        ('{"auths": ["hunter2"]}', "auths is not an object"),
        ('{"credHelpers": {"r.example.com": ["hunter2"]}}', "credHelpers"),
    ],
)
def test_unusable_file_is_config_error_without_content(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        RegistryAuth.load(path)
    message = str(caught.value)
    assert str(path) in message
    assert problem in message
    # Neither the secret nor its encodings leak into the message.
    for secret in ("hunter2", "aHVudGVyMj", "aHVudGVyMg"):
        assert secret not in message


async def test_reload_picks_up_changes_and_keeps_the_old_on_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"auths": {"r.example.com": {"auth": b64("u:first")}}})
    auth = RegistryAuth.load(path)
    with trio.fail_after(5):
        assert decode_header(await auth.header_for("r.example.com/a"))["password"] == "first"
        write_config(tmp_path, {"auths": {"r.example.com": {"auth": b64("u:second")}}})
        auth.reload()
        assert decode_header(await auth.header_for("r.example.com/a"))["password"] == "second"
        path.write_text("{broken")
        with pytest.raises(ConfigError):
            auth.reload()
        assert decode_header(await auth.header_for("r.example.com/a"))["password"] == "second"
        path.unlink()
        auth.reload()  # the file went away: anonymous from now on
        assert await auth.header_for("r.example.com/a") is None


def test_header_is_urlsafe_padded_base64_of_json() -> None:
    credentials = Credentials(server_address="r:1", username="u", password="??~~")
    header = credentials.header()
    decoded = base64.urlsafe_b64decode(header)
    # The precondition that makes this test bite: the standard alphabet would need "+" or "/"
    # here and the length needs padding, exactly what the engine silently reads as "no
    # credentials" when the encoding is wrong.
    standard = base64.b64encode(decoded).decode()
    assert "+" in standard or "/" in standard
    assert standard.endswith("=")
    assert "+" not in header
    assert "/" not in header
    assert header.endswith("=")
    assert len(header) % 4 == 0
    assert json.loads(decoded) == {"serveraddress": "r:1", "username": "u", "password": "??~~"}


def test_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    auth = RegistryAuth.load(
        write_config(tmp_path, {"auths": {"r.example.com": {"auth": b64("u:hunter2")}}})
    )
    credentials = Credentials(server_address="r", username="u", password="hunter2")
    token = Credentials(server_address="r", identity_token="hunter2")
    for text in (repr(auth), repr(credentials), repr(token), str(credentials)):
        assert "hunter2" not in text
    assert "config.json" in repr(auth)
