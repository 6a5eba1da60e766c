"""The Docker files, checked without a Docker engine.

No engine runs on CI, so these tests hold the images to what can be read:
the compose file's services and mounts, the images' install commands against
the Makefile's (what CI runs), pinned bases, a non-root user, a
``.dockerignore`` that keeps data, shards and ``.venv`` out of the context, and
that every cluster recipe speaks TLS with mutual certificates by default
(``tests/test_scale_tls.py`` runs such a cluster and the SLURM recipe for real).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ("docker/train.Dockerfile", "docker/worker.Dockerfile")


# --------------------------------------------------------------------------- readers


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs with line continuations joined and comments dropped."""
    joined: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued RUN
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    if buf:
        joined.append(buf)
    out = []
    for line in joined:
        instr, _, arg = line.partition(" ")
        out.append((instr.upper(), " ".join(arg.split())))
    return out


def makefile_install_commands() -> list[str]:
    """The pip-related shell lines of the Makefile's venv recipe, with $(VPY) -> python."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    cmds = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        cmd = line.strip()
        if cmd.startswith("#") or "pip" not in cmd:
            continue
        cmds.append(" ".join(cmd.replace("$(VPY)", "python").split()))
    return cmds


def makefile_exports() -> dict[str, str]:
    exports = {}
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"export\s+(\w+)\s*[:?]?=\s*(\S+)", line)
        if m:
            exports[m.group(1)] = m.group(2)
    return exports


def dockerfile_env(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for instr, arg in instrs:
        if instr == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", arg):
                env[key] = value
    return env


def dockerignore_excludes(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent dir matches."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        rules.append((negate, re.compile(rx)))
    return rules


def load_compose() -> dict:
    return yaml.safe_load((REPO / "docker/compose.yaml").read_text())


# What scripts/make_tls_certs.sh writes, by role.
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
CLUSTER_FILES = {"ca.pem", "cluster.pem", "cluster-key.pem"}
CLIENT_FILES = {"ca.pem", "client.pem", "client-key.pem"}


def tls_flags(args: list) -> dict[str, str]:
    """``--tls-ca-file/--tls-cert/--tls-key`` -> value in a command's argument list."""
    args = [str(a) for a in args]
    return {a: args[i + 1] for i, a in enumerate(args) if a in ("--tls-ca-file", "--tls-cert", "--tls-key")}


def volume_targets(service: dict) -> dict[str, dict]:
    out = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target, *mode = vol.split(":")
            vol = {"source": source, "target": target, "read_only": mode == ["ro"]}
        out[vol["target"]] = vol
    return out


# --------------------------------------------------------------------------- compose


def test_compose_has_scheduler_workers_and_driver():
    compose = load_compose()
    services = compose["services"]
    assert {"scheduler", "worker", "build"} <= set(services)
    # One image for all: Dask unpickles task functions, so code and versions must match everywhere.
    images = {name: svc["image"] for name, svc in services.items()}
    assert len(set(images.values())) == 1, images
    for svc in services.values():
        assert svc["build"]["dockerfile"] == "docker/worker.Dockerfile"
        assert (REPO / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().is_file()

    sched = services["scheduler"]["command"]
    assert sched[:2] == ["dask", "scheduler"] and "8786" in sched


def test_compose_cluster_speaks_tls_with_certificates_from_secrets():
    compose = load_compose()
    services = compose["services"]
    secrets = {name: Path(spec["file"]).name for name, spec in compose["secrets"].items()}
    # Every secret is a file of scripts/make_tls_certs.sh from CTPREP_TLS_DIR, which has no default.
    assert set(secrets.values()) <= CLUSTER_FILES | CLIENT_FILES and CA_KEY not in secrets.values()
    for spec in compose["secrets"].values():
        assert spec["file"].startswith("${CTPREP_TLS_DIR:?"), spec

    def mounted(service: str) -> dict[str, str]:
        names = services[service].get("secrets", [])
        return {f"/run/secrets/{n}": secrets[n] for n in names}

    sched = [str(c) for c in services["scheduler"]["command"]]
    assert sched[sched.index("--protocol") + 1] == "tls"
    for name in ("scheduler", "worker"):
        files = mounted(name)
        assert set(files.values()) == CLUSTER_FILES, name  # never the client key
        flags = tls_flags(services[name]["command"])
        assert {files[flags["--tls-ca-file"]], files[flags["--tls-cert"]], files[flags["--tls-key"]]} == CLUSTER_FILES
        assert files[flags["--tls-cert"]] == "cluster.pem" and files[flags["--tls-key"]] == "cluster-key.pem"
    build = services["build"]
    files = mounted("build")
    assert set(files.values()) == CLIENT_FILES  # never the cluster key
    env = build["environment"]
    assert files[env["CTPREP_TLS_CA_FILE"]] == "ca.pem"
    assert files[env["CTPREP_TLS_CERT"]] == "client.pem" and files[env["CTPREP_TLS_KEY"]] == "client-key.pem"
    # The comm port is TLS-only; the plain-HTTP dashboard is published on the host's loopback only.
    ports = [str(p) for p in services["scheduler"]["ports"]]
    assert "8786:8786" in ports
    assert all(p.startswith("127.0.0.1:") for p in ports if p.endswith(":8787")), ports
    # The healthcheck does not open bare TCP connections to the TLS port (each would log a failed handshake).
    assert "8786" not in " ".join(services["scheduler"]["healthcheck"]["test"])


def test_compose_worker_is_single_threaded_memory_limited_and_scalable():
    worker = load_compose()["services"]["worker"]
    cmd = [str(c) for c in worker["command"]]
    assert cmd[:3] == ["dask", "worker", "tls://scheduler:8786"]
    assert cmd[cmd.index("--nthreads") + 1] == "1"
    assert "--memory-limit" in cmd
    assert "replicas" in worker["deploy"]
    assert "memory" in worker["deploy"]["resources"]["limits"]
    assert worker["depends_on"]["scheduler"]["condition"] == "service_healthy"


def test_compose_mounts_data_read_only_and_output_on_workers_and_driver():
    services = load_compose()["services"]
    for name in ("worker", "build"):
        vols = volume_targets(services[name])
        assert vols["/data"]["read_only"] is True, name
        assert not vols["/out"].get("read_only", False), name
    # The driver's paths are sent to the workers verbatim: they must see the same mount points.
    assert volume_targets(services["worker"]).keys() == volume_targets(services["build"]).keys()
    build_cmd = services["build"]["command"]
    assert "--scheduler" in build_cmd and build_cmd[build_cmd.index("--scheduler") + 1] == "tls://scheduler:8786"
    assert services["build"]["profiles"] == ["run"]


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates_with_the_compose_cli(tmp_path):
    """`compose config` validates against the Compose schema and needs no engine."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither the `docker compose` plugin nor `docker-compose` is installed")
    tls = tmp_path / "tls"  # the secrets' files need not be real certificates for `config`
    tls.mkdir()
    for name in CLUSTER_FILES | CLIENT_FILES:
        (tls / name).write_text("placeholder\n")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "CTPREP_WORKERS": "5", "HOME": str(tmp_path),
           "CTPREP_TLS_DIR": str(tls)}
    res = subprocess.run(
        [*cli, "-f", str(REPO / "docker/compose.yaml"), "--profile", "run", "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert {"scheduler", "worker", "build"} <= set(resolved["services"])
    assert int(resolved["services"]["worker"]["deploy"]["replicas"]) == 5


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_project_with_the_makefile_commands(name):
    instrs = dockerfile_instructions(REPO / name)
    run_text = " && ".join(arg for instr, arg in instrs if instr == "RUN")
    commands = makefile_install_commands()
    assert any("-e" in c and "pip install" in c for c in commands), commands
    for cmd in commands:
        # The Makefile's `A || B` fallback appears parenthesised inside the RUN chain.
        for part in cmd.split(" || "):
            part = part.replace("2>/dev/null", "").strip()
            assert " ".join(part.split()) in run_text, f"{name} lacks the Makefile step: {part}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_base_is_pinned_and_user_is_not_root(name):
    instrs = dockerfile_instructions(REPO / name)
    args = {}
    for instr, arg in instrs:
        if instr == "ARG" and "=" in arg:
            key, _, value = arg.partition("=")
            args[key] = value.strip('"')
    base = next(arg for instr, arg in instrs if instr == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base).split()[0]
    repo_part, _, tag = base.rpartition(":")
    assert repo_part and tag and tag != "latest" and "/" not in tag, f"unpinned base {base}"
    assert re.search(r"\d", tag), f"base tag without a version: {base}"
    users = [arg for instr, arg in instrs if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name} must end as a non-root user"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_env_matches_the_makefile_offline_settings(name):
    env = dockerfile_env(dockerfile_instructions(REPO / name))
    for key, value in makefile_exports().items():
        if key == "DS_ACCELERATOR":
            continue  # CPU in the Makefile; the GPU image must auto-detect CUDA
        assert env.get(key) == value, f"{name}: {key}"
    if name == "docker/train.Dockerfile":
        assert "DS_ACCELERATOR" not in env


def test_worker_image_uses_cpu_torch_at_the_makefile_pin():
    instrs = dockerfile_instructions(REPO / "docker/worker.Dockerfile")
    args = dict(arg.split("=", 1) for instr, arg in instrs if instr == "ARG" and "=" in arg)
    makefile_pin = re.search(r"torch==([\w.+]+)", (REPO / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_pin
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    torch_run = next(arg for instr, arg in instrs if instr == "RUN" and "TORCH_INDEX_URL" in arg)
    assert "--index-url" in torch_run and "TORCH_VERSION" in torch_run
    env = dockerfile_env(instrs)
    assert env["OMP_NUM_THREADS"] == "1"


def test_train_image_installs_the_tested_torch_then_prebuilds_deepspeed_ops_against_it():
    instrs = dockerfile_instructions(REPO / "docker/train.Dockerfile")
    args = dict(arg.split("=", 1) for instr, arg in instrs if instr == "ARG" and "=" in arg)
    makefile_pin = re.search(r"torch==([\w.+]+)", (REPO / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_pin  # the GPU image runs the torch line the tests run
    ds_run = next(arg for instr, arg in instrs if instr == "RUN" and "deepspeed==" in arg)
    assert "DS_BUILD_FUSED_ADAM=1" in ds_run and "--no-build-isolation" in ds_run
    torch_at = ds_run.find('"torch==${TORCH_VERSION}"')
    assert 0 <= torch_at < ds_run.find("deepspeed=="), "torch must be installed before DeepSpeed's op build"
    assert "torch.version.cuda" in ds_run, "the image must check that it got a CUDA build of torch"
    base_arg = next(arg for instr, arg in instrs if instr == "ARG" and arg.startswith("BASE_IMAGE="))
    assert "devel" in base_arg, "DeepSpeed ops need nvcc: use a devel base"
    ds_pin = next(arg for instr, arg in instrs if instr == "ARG" and arg.startswith("DEEPSPEED_VERSION="))
    floor = re.search(r'"deepspeed>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(ds_pin.split("=")[1]) >= as_tuple(floor)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_exist_and_are_not_ignored(name):
    rules = dockerignore_rules()
    for instr, arg in dockerfile_instructions(REPO / name):
        if instr != "COPY" or arg.startswith("--from"):
            continue
        *sources, _dest = arg.split()
        for src in sources:
            assert (REPO / src).exists(), f"{name}: COPY {src} is not in the repo"
            assert not dockerignore_excludes(src, rules), f"{name}: COPY {src} is excluded by .dockerignore"


# --------------------------------------------------------------------------- .dockerignore


@pytest.mark.parametrize(
    "path",
    [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/objects/ab/cdef",
        "shards/train/ctrate-000000.tar",
        "runs/demo/checkpoints/step_10/model.pt",
        "demo/ctrate/train/train_1/train_1_a/train_1_a_1.nii.gz",
        "data/ctrate/volume.nii.gz",
        "somewhere/else/case.nii.gz",
        "out/work/zarr/case.zarr/image/c/0/0/0",
        "out/work/manifest.sqlite",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        "ctprep.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_excludes_heavy_paths(path):
    assert dockerignore_excludes(path, dockerignore_rules()), path


@pytest.mark.parametrize(
    "path",
    ["pyproject.toml", "README.md", "pipeline/ctprep/cli.py", "trainer/ctprep_train/__init__.py", "configs/regions/x.json", "docker/compose.yaml"],
)
def test_dockerignore_keeps_sources(path):
    assert not dockerignore_excludes(path, dockerignore_rules()), path


# --------------------------------------------------------------------------- cluster recipes


def test_kubernetes_daskcluster_matches_the_compose_worker():
    spec = yaml.safe_load((REPO / "docker/cluster/daskcluster.yaml").read_text())
    assert spec["kind"] == "DaskCluster" and spec["apiVersion"].startswith("kubernetes.dask.org/")
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    args = [str(a) for a in worker["args"]]
    assert args[:2] == ["dask", "worker"]
    assert args[args.index("--nthreads") + 1] == "1" and "--memory-limit" in args
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/data"]["readOnly"] is True and "/out" in mounts
    # The driver pod sees the same paths as the workers (paths are sent verbatim).
    import json

    driver = json.loads((REPO / "docker/cluster/driver-overrides.json").read_text())["spec"]["containers"][0]
    assert {m["mountPath"] for m in driver["volumeMounts"]} == set(mounts)
    assert "--scheduler" in driver["args"]
    compose_image = load_compose()["services"]["worker"]["image"]
    assert worker["image"].split(":")[0] in compose_image


def _secret_files(pod_spec: dict, container: dict) -> dict[str, str]:
    """mountPath/key -> secret name for the secret volumes a container mounts."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod_spec["volumes"] if "secret" in v}
    return {m["mountPath"]: secrets[m["name"]] for m in container["volumeMounts"] if m["name"] in secrets}


def test_kubernetes_cluster_speaks_tls_with_certificates_from_secrets():
    import json

    spec = yaml.safe_load((REPO / "docker/cluster/daskcluster.yaml").read_text())["spec"]
    driver_spec = json.loads((REPO / "docker/cluster/driver-overrides.json").read_text())["spec"]
    pods = {
        "scheduler": (spec["scheduler"]["spec"], spec["scheduler"]["spec"]["containers"][0], "args"),
        "worker": (spec["worker"]["spec"], spec["worker"]["spec"]["containers"][0], "args"),
    }
    sched_args = [str(a) for a in pods["scheduler"][1]["args"]]
    assert sched_args[sched_args.index("--protocol") + 1] == "tls"
    worker_args = [str(a) for a in pods["worker"][1]["args"]]
    # Explicit tls:// address: the operator's DASK_SCHEDULER_ADDRESS variable says tcp://.
    assert worker_args[2] == "tls://ctprep-scheduler:8786"
    secret_names = set()
    for name, (pod, container, _) in pods.items():
        mounts = _secret_files(pod, container)
        assert len(mounts) == 1, name
        (folder, secret), = mounts.items()
        secret_names.add(secret)
        flags = tls_flags(container["args"])
        assert {Path(v).parent.as_posix() for v in flags.values()} == {folder}, name
        assert {Path(v).name for v in flags.values()} == CLUSTER_FILES, name
        assert pod["securityContext"]["fsGroup"] == 1000  # the image's user reads the 0440 files
    assert len(secret_names) == 1  # scheduler and workers: ctprep-dask-tls-cluster
    driver = driver_spec["containers"][0]
    assert driver["args"][driver["args"].index("--scheduler") + 1] == "tls://ctprep-scheduler:8786"
    (folder, driver_secret), = _secret_files(driver_spec, driver).items()
    assert driver_secret not in secret_names, "the driver's client key lives in its own secret"
    env = {e["name"]: e["value"] for e in driver["env"]}
    assert {Path(env[k]).name for k in ("CTPREP_TLS_CA_FILE", "CTPREP_TLS_CERT", "CTPREP_TLS_KEY")} == CLIENT_FILES
    assert {Path(env[k]).parent.as_posix() for k in env if k.startswith("CTPREP_TLS_")} == {folder}
    # The recipe's kubectl lines put exactly those files into the two secrets (and never ca-key.pem).
    text = (REPO / "docker/cluster/daskcluster.yaml").read_text().split("apiVersion:")[0]
    header = " ".join(line.lstrip("#").strip().rstrip("\\") for line in text.splitlines())
    for secret, files in ((secret_names.pop(), CLUSTER_FILES), (driver_secret, CLIENT_FILES)):
        chunk = header.split(f"create secret generic {secret} ")[1].split("kubectl")[0]
        assert {Path(f).name for f in re.findall(r"--from-file=(\S+)", chunk)} == files, secret


def test_slurm_recipes_are_valid_scripts():
    import py_compile

    res = subprocess.run(["bash", "-n", str(REPO / "docker/cluster/slurm_dask.sbatch")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = (REPO / "docker/cluster/slurm_dask.sbatch").read_text()
    assert "--nthreads 1" in text and "--memory-limit" in text and "--scheduler" in text
    py_compile.compile(str(REPO / "docker/cluster/jobqueue_build_shards.py"), doraise=True)


def test_slurm_recipes_use_tls():
    text = (REPO / "docker/cluster/slurm_dask.sbatch").read_text()
    scheduler = next(line for line in text.splitlines() if '/dask" scheduler' in line)
    worker = next(line for line in text.splitlines() if '/dask" worker' in line)
    assert "--protocol tls" in scheduler and "CLUSTER_TLS" in scheduler and "CLUSTER_TLS" in worker
    assert "make_tls_certs.sh" in text and "CTPREP_TLS_CERT=" in text
    jobqueue = (REPO / "docker/cluster/jobqueue_build_shards.py").read_text()
    assert 'protocol="tls://"' in jobqueue and "security=security" in jobqueue and '"--tls-cert"' in jobqueue


def _flags(args: list) -> set[str]:
    return {str(a) for a in args if str(a).startswith("--")}


def _driver_args() -> list[str]:
    import json

    return json.loads((REPO / "docker/cluster/driver-overrides.json").read_text())["spec"]["containers"][0]["args"]


def test_recipe_flags_exist_in_the_installed_clis():
    """Every flag the compose file and recipes pass is one the installed dask / ctprep accept."""
    import sys

    bin_dir = Path(sys.executable).parent
    helps = {}
    for name, cmd in {
        "worker": [str(bin_dir / "dask"), "worker", "--help"],
        "scheduler": [str(bin_dir / "dask"), "scheduler", "--help"],
        "build": [str(bin_dir / "ctprep"), "build-shards", "--help"],
    }.items():
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
        assert res.returncode == 0, res.stderr
        helps[name] = res.stdout
    services = load_compose()["services"]
    k8s = yaml.safe_load((REPO / "docker/cluster/daskcluster.yaml").read_text())["spec"]
    used = {
        "worker": _flags(services["worker"]["command"]) | _flags(k8s["worker"]["spec"]["containers"][0]["args"]),
        "scheduler": _flags(services["scheduler"]["command"]) | _flags(k8s["scheduler"]["spec"]["containers"][0]["args"]),
        "build": _flags(services["build"]["command"]) | _flags(_driver_args()),
    }
    for name, flags in used.items():
        missing = sorted(f for f in flags if f not in helps[name])
        assert not missing, f"{name}: flags not accepted by the installed CLI: {missing}"
