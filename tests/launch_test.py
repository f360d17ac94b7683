"""The launch scripts: they parse, pass shellcheck, and under --dry-run print the right commands.

Nothing here reaches a cloud: every gcloud command is only printed. worker.sh and batch_task.sh,
which run on the hosts, are also run for real on local directories where they need no cloud.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
CONFIG = "configs/demo.py"  # any config file in the repo; the scripts check that it exists


def in_git_checkout() -> bool:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, check=False).returncode == 0


needs_git = pytest.mark.skipif(not in_git_checkout(), reason="the launchers ship git HEAD; not a git checkout")


def script_env(tmp_path, **extra):
    """A clean environment: none of the caller's cloud settings leak into the scripts."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def launch(tmp_path, script, *args, check=True, env=None):
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=script_env(tmp_path, **(env or {})), check=False)
    if check:
        assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stderr}"
    return proc


TPU = ("--dry-run", "--project", "my-proj", "--zone", "us-east5-a", "--name", "sdft-pod", "--type", "v5p-16",
       "--bucket", "gs://my-bucket/")


def commands(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.strip()]


def test_scripts_parse():
    assert {p.name for p in SCRIPTS} >= {"tpu.sh", "cloud_batch.sh", "worker.sh", "batch_task.sh", "common.sh"}
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install -y shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", *(str(p.relative_to(REPO)) for p in SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_are_strict_and_executable():
    for script in SCRIPTS:
        text = script.read_text()
        if script.name != "common.sh":  # sourced, never run
            assert "set -euo pipefail" in text, script.name
            assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.parametrize("script", ["tpu.sh", "cloud_batch.sh", "worker.sh", "batch_task.sh"])
def test_help(tmp_path, script):
    proc = launch(tmp_path, script, "--help")
    assert "--dry-run" in proc.stdout


# --- TPU VMs ----------------------------------------------------------------------------------------

def test_tpu_create(tmp_path):
    (cmd,) = commands(launch(tmp_path, "tpu.sh", *TPU, "create"))
    assert cmd == ("gcloud compute tpus tpu-vm create sdft-pod --project=my-proj --zone=us-east5-a "
                   "--accelerator-type=v5p-16 --version=v2-alpha-tpuv5")


@pytest.mark.parametrize("tpu_type, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-64", "v2-alpha-tpuv6e")])
def test_tpu_create_queued_spot(tmp_path, tpu_type, runtime):
    args = [a if a != "v5p-16" else tpu_type for a in TPU]
    create, poll = commands(launch(tmp_path, "tpu.sh", *args, "create", "--queued", "--spot"))
    assert create == (f"gcloud compute tpus queued-resources create sdft-pod --project=my-proj --zone=us-east5-a "
                      f"--node-id=sdft-pod --accelerator-type={tpu_type} --runtime-version={runtime} --spot")
    assert poll.startswith("gcloud compute tpus queued-resources describe sdft-pod") and "state.state" in poll


def test_tpu_create_needs_a_known_type_or_runtime(tmp_path):
    args = [a if a != "v5p-16" else "v9x-8" for a in TPU]
    proc = launch(tmp_path, "tpu.sh", *args, "create", check=False)
    assert proc.returncode != 0 and "unknown TPU type 'v9x-8'" in proc.stderr
    (cmd,) = commands(launch(tmp_path, "tpu.sh", *args, "create", "--runtime", "custom-rt"))
    assert cmd.endswith("--version=custom-rt")


def test_tpu_missing_settings_are_named(tmp_path):
    proc = launch(tmp_path, "tpu.sh", "--dry-run", "create", check=False)
    assert proc.returncode != 0
    for flag in ("--project (or PROJECT)", "--zone (or ZONE)", "--name (or TPU_NAME)", "--type (or TPU_TYPE)"):
        assert flag in proc.stderr
    # The environment works as well as flags.
    env = {"PROJECT": "p", "ZONE": "z", "TPU_NAME": "n", "TPU_TYPE": "v6e-8"}
    (cmd,) = commands(launch(tmp_path, "tpu.sh", "--dry-run", "create", env=env))
    assert cmd.startswith("gcloud compute tpus tpu-vm create n --project=p --zone=z --accelerator-type=v6e-8")


def test_tpu_rejects_unsafe_values(tmp_path):
    proc = launch(tmp_path, "tpu.sh", *TPU, "train", "--run-name", "a b; rm -rf /", check=False)
    assert proc.returncode != 0 and "--run-name" in proc.stderr


@needs_git
def test_tpu_install_ships_head_to_every_worker(tmp_path):
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    archive, upload, ssh = commands(launch(tmp_path, "tpu.sh", *TPU, "install"))
    assert archive.startswith(f"git -C {REPO} archive") and archive.endswith("HEAD")
    assert upload == f"gcloud storage cp {tmp_path}/sdft-jax-{rev}.tar.gz gs://my-bucket/code/sdft-jax-{rev}.tar.gz"
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh sdft-pod --project=my-proj --zone=us-east5-a --worker=all")
    assert f"gs://my-bucket/code/sdft-jax-{rev}.tar.gz" in ssh and f"echo {rev}" in ssh
    assert "--python 3.11" in ssh and "sdft-jax[tpu,gcs]" in ssh


@needs_git
@pytest.mark.parametrize("command, module, config", [
    ("train", "sdft_jax.train", CONFIG), ("continual", "sdft_jax.continual", CONFIG)])
def test_tpu_run_on_every_worker(tmp_path, command, module, config):
    proc = launch(tmp_path, "tpu.sh", *TPU, command, "--config", config, "--run-name", "run-1",
                  "--model-src", "gs://my-bucket/models/qwen3-8b", "--data-src", "gs://my-bucket/data",
                  "--", "--config.train.steps=5", "--config.eval.tasks=tooluse, science")
    start, follow = commands(proc)
    assert start.startswith("gcloud compute tpus tpu-vm ssh sdft-pod --project=my-proj --zone=us-east5-a "
                            "--worker=all '--command=")
    for piece in ("SDFT_CLUSTER_DETECTION=always", "SDFT_INIT_TIMEOUT_S=", "HF_HUB_OFFLINE=1",
                  "JAX_COMPILATION_CACHE_DIR=gs://my-bucket/jax-cache", "setsid nohup", "bash launch/worker.sh",
                  "--expect-revision ", "--upload-log gs://my-bucket/runs/run-1/logs",
                  '--stage gs://my-bucket/models/qwen3-8b="$HOME/sdft-stage/model"',
                  f"python -m {module} --config={config} --config.run_dir=gs://my-bucket/runs/run-1",
                  '--config.model.name="$HOME/sdft-stage/model"', '--config.data.data_dir="$HOME/sdft-stage/data"',
                  "--config.train.steps=5",
                  # A value with spaces stays one word on the worker (quoted twice: for the worker's shell
                  # inside --command, and for ours in the printed line).
                  "'\\''--config.eval.tasks=tooluse, science'\\''"):
        assert piece in start, piece
    assert follow.startswith("gcloud compute tpus tpu-vm ssh sdft-pod") and "--worker=0" in follow
    assert 'tail -n +1 -F "$HOME/sdft-logs/run-1.log"' in follow


FAKE_TOOL = """#!/usr/bin/env bash
# Records how it was called; as `gcloud storage cp --recursive SRC/* DEST/` it also fills DEST.
{{ printf '%s\\n' "$0" "$@"; echo ---; env | grep -E '^(SDFT_|HF_HUB_OFFLINE|JAX_)' | sort; echo ===; }} >> {record}
if [[ "$(basename "$0")" == gcloud && "$2" == cp && "$3" == --recursive ]]; then touch "${{@: -1}}/weights"; fi
"""


@needs_git
def test_tpu_train_command_runs_on_a_worker(tmp_path):
    """The printed --command, run by a worker's shell, reaches the trainer with every argument intact."""
    import shlex

    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    worker_home = tmp_path / "worker"
    code = worker_home / "sdft-jax"
    shutil.copytree(LAUNCH, code / "launch")
    (code / "REVISION").write_text(rev + "\n")
    record = tmp_path / "calls.txt"
    bin_dir = worker_home / "sdft-venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "gcloud"):
        (bin_dir / tool).write_text(FAKE_TOOL.format(record=shlex.quote(str(record))))
        (bin_dir / tool).chmod(0o755)

    (start,) = commands(launch(tmp_path, "tpu.sh", *TPU, "train", "--config", CONFIG, "--run-name", "run-1",
                               "--model-src", "gs://my-bucket/models/m", "--no-follow",
                               "--", "--config.eval.tasks=tooluse, science", "--config.note=it's"))
    (remote,) = [w[len("--command="):] for w in shlex.split(start) if w.startswith("--command=")]
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(worker_home)}
    subprocess.run(["bash", "-c", remote], env=env, cwd=worker_home, check=True, timeout=30)
    pid = int((worker_home / "sdft-logs" / "run-1.pid").read_text())
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)

    calls = []  # (tool, arguments, environment) in call order
    for call in record.read_text().split("===\n")[:-1]:
        words, environment = call.split("---\n")
        tool, *arguments = words.split("\n")[:-1]
        calls.append((pathlib.Path(tool).name, arguments, environment))
    (_, stage, _), (_, python_args, python_env), (_, upload, _) = calls
    assert stage == ["storage", "cp", "--recursive", "gs://my-bucket/models/m/*", f"{worker_home}/sdft-stage/model/"]
    assert (worker_home / "sdft-stage" / "model" / ".staged").exists()
    assert upload[:3] == ["storage", "cp", f"{worker_home}/sdft-logs/run-1.log"]
    assert upload[3] == f"gs://my-bucket/runs/run-1/logs/{socket.gethostname()}.log"
    args = python_args
    assert args == ["-m", "sdft_jax.train", f"--config={CONFIG}", "--config.run_dir=gs://my-bucket/runs/run-1",
                    f"--config.model.name={worker_home}/sdft-stage/model",
                    "--config.eval.tasks=tooluse, science", "--config.note=it's"]
    for line in ("SDFT_CLUSTER_DETECTION=always", "HF_HUB_OFFLINE=1", "JAX_COMPILATION_CACHE_DIR=gs://my-bucket/jax-cache"):
        assert line in python_env.splitlines()
    assert "exit status 0" in (worker_home / "sdft-logs" / "run-1.log").read_text()


@needs_git
def test_tpu_train_without_follow_and_missing_config(tmp_path):
    (start,) = commands(launch(tmp_path, "tpu.sh", *TPU, "train", "--config", CONFIG, "--no-follow"))
    assert "python -m sdft_jax.train --config=configs/demo.py --config.run_dir=gs://my-bucket/runs/train-" in start
    proc = launch(tmp_path, "tpu.sh", *TPU, "train", "--config", "configs/nope.py", check=False)
    assert proc.returncode != 0 and "config configs/nope.py not found" in proc.stderr


def test_tpu_logs_stop_status_delete(tmp_path):
    (logs,) = commands(launch(tmp_path, "tpu.sh", *TPU, "logs", "--run-name", "run-1", "--worker", "3"))
    assert "--worker=3" in logs and "sdft-logs/run-1.log" in logs
    (stop,) = commands(launch(tmp_path, "tpu.sh", *TPU, "stop", "--run-name", "run-1"))
    assert "--worker=all" in stop and "sdft-logs/run-1.pid" in stop and "kill -TERM" in stop
    (status,) = commands(launch(tmp_path, "tpu.sh", *TPU, "status"))
    assert status == "gcloud compute tpus tpu-vm describe sdft-pod --project=my-proj --zone=us-east5-a"
    (delete,) = commands(launch(tmp_path, "tpu.sh", *TPU, "delete"))
    assert delete == "gcloud compute tpus tpu-vm delete sdft-pod --project=my-proj --zone=us-east5-a --quiet"
    (delete,) = commands(launch(tmp_path, "tpu.sh", *TPU, "delete", "--queued"))
    assert delete == ("gcloud compute tpus queued-resources delete sdft-pod --project=my-proj --zone=us-east5-a "
                      "--force --quiet")
    proc = launch(tmp_path, "tpu.sh", *TPU, "logs", check=False)
    assert proc.returncode != 0 and "--run-name (or RUN_NAME)" in proc.stderr


def test_tpu_plan_checks_the_config_on_the_slices_chips_with_the_tpu_compiler(tmp_path):
    # v5p-64 names 64 TensorCores: 32 chips. The trainer's overrides become plan's --set.
    (plan,) = commands(launch(tmp_path, "tpu.sh", "--dry-run", "plan", "--type", "v5p-64", "--config",
                              "configs/qwen3_5_35b_a3b.py", "--", "--config.train.micro_batch_size=0"))
    assert plan == (f"python3 -m sdft_jax.bench plan --config={REPO}/configs/qwen3_5_35b_a3b.py --devices 32 "
                    "--chip v5p --compiler tpu --set train.micro_batch_size=0")
    (plan,) = commands(launch(tmp_path, "tpu.sh", "--dry-run", "plan", "--type", "v6e-16", env={"PYTHON": "py"}))
    assert plan == (f"py -m sdft_jax.bench plan --config={REPO}/configs/qwen3_8b_tpu.py --devices 16 --chip v6e "
                    "--compiler tpu")
    for args, message in [(("--type", "v4-32"), "plan knows v5p and v6e slices, not 'v4-32'"),
                          (("--type", "v5p-64", "--", "--steps=3"), "plan takes the trainer's overrides"),
                          ((), "--type (or TPU_TYPE)")]:
        proc = launch(tmp_path, "tpu.sh", "--dry-run", "plan", *args, check=False)
        assert proc.returncode == 1 and message in proc.stderr and not proc.stdout


# --- Cloud Batch (GPU VMs) --------------------------------------------------------------------------

BATCH = ("--dry-run", "--project", "my-proj", "--region", "us-central1", "--name", "sdft-8b", "--bucket",
         "gs://my-bucket")


def test_job_spec_template_is_json():
    spec = json.loads((LAUNCH / "cloud_batch_job.json").read_text())
    group = spec["taskGroups"][0]
    assert group["requireHostsFile"] is True and group["taskCountPerNode"] == 1


@needs_git
def test_batch_submit(tmp_path):
    job_file = tmp_path / "job.json"
    proc = launch(tmp_path, "cloud_batch.sh", *BATCH, "submit", "--nodes", "2", "--config", CONFIG,
                  "--run-name", "run-2", "--model-src", "gs://my-bucket/models/qwen3-8b", "--spot",
                  "--job-file", str(job_file), "--", "--config.mesh.fsdp=16")
    archive, upload, submit = commands(proc)
    assert archive.startswith("git -C") and upload.startswith("gcloud storage cp")
    assert submit == f"gcloud batch jobs submit sdft-8b --project=my-proj --location=us-central1 --config={job_file}"
    spec = json.loads(job_file.read_text())
    group = spec["taskGroups"][0]
    assert group["taskCount"] == 2 and group["parallelism"] == 2 and group["requireHostsFile"] is True
    assert group["taskSpec"]["volumes"][0]["gcs"]["remotePath"] == "my-bucket"
    policy = spec["allocationPolicy"]["instances"][0]["policy"]
    assert policy["provisioningModel"] == "SPOT" and policy["accelerators"] == [{"type": "nvidia-h100-80gb", "count": 8}]
    script = group["taskSpec"]["runnables"][0]["script"]["text"]
    for piece in ("tar -xzf /mnt/disks/sdft/code/sdft-jax-", "HF_HUB_OFFLINE=1", "SDFT_INIT_TIMEOUT_S=",
                  "exec bash /opt/sdft-jax/launch/batch_task.sh --port 8482",
                  "--stage /mnt/disks/sdft/models/qwen3-8b=/opt/sdft-stage/model",
                  "--upload-log /mnt/disks/sdft/runs/run-2/logs",
                  ("-- python -m sdft_jax.train --config=configs/demo.py --config.run_dir=gs://my-bucket/runs/run-2 "
                   "--config.model.name=/opt/sdft-stage/model --config.mesh.fsdp=16")):
        assert piece in script, piece


def test_batch_sources_must_be_in_the_mounted_bucket(tmp_path):
    if not in_git_checkout():
        pytest.skip("the launchers ship git HEAD; not a git checkout")
    proc = launch(tmp_path, "cloud_batch.sh", *BATCH, "submit", "--config", CONFIG, "--model-src",
                  "gs://other/models/m", "--job-file", str(tmp_path / "j.json"), check=False)
    assert proc.returncode != 0 and "gs://other/models/m is not in gs://my-bucket" in proc.stderr


def test_batch_status_logs_delete(tmp_path):
    (status,) = commands(launch(tmp_path, "cloud_batch.sh", *BATCH, "status"))
    assert status == "gcloud batch jobs describe sdft-8b --project=my-proj --location=us-central1"
    describe, read = commands(launch(tmp_path, "cloud_batch.sh", *BATCH, "logs"))
    assert "value(uid)" in describe and read.startswith("gcloud logging read") and "batch_task_logs" in read
    (delete,) = commands(launch(tmp_path, "cloud_batch.sh", *BATCH, "delete"))
    assert delete == "gcloud batch jobs delete sdft-8b --project=my-proj --location=us-central1 --quiet"
    proc = launch(tmp_path, "cloud_batch.sh", *BATCH[:-2], "--name", "Bad_Name", "status", check=False)
    assert proc.returncode != 0 and "--name 'Bad_Name'" in proc.stderr


def write_hosts(tmp_path, *hosts):
    path = tmp_path / "hosts"
    path.write_text("".join(f"{h}\n" for h in hosts))
    return str(path)


def test_batch_task_finds_its_process_id_in_the_hosts_file(tmp_path):
    # This machine is the second VM of the hosts file, whatever its Batch task index says.
    env = {"BATCH_TASK_INDEX": "0", "BATCH_TASK_COUNT": "2",
           "BATCH_HOSTS_FILE": write_hosts(tmp_path, "vm-0", socket.gethostname())}
    proc = launch(tmp_path, "batch_task.sh", "--dry-run", "--port", "9000", "--", "python", "-m", "sdft_jax.train",
                  f"--config={CONFIG}", env=env)
    *install, run = commands(proc)
    assert any("uv venv" in c and "--python 3.11" in c for c in install)
    assert any(c.endswith(f"-e '{REPO}[cuda,gcs]'") for c in install)
    assert run.startswith("env HF_HUB_OFFLINE=1 SDFT_CLUSTER_DETECTION=never SDFT_COORDINATOR=vm-0:9000 "
                          "SDFT_NUM_PROCESSES=2 SDFT_PROCESS_ID=1 ")
    assert run.endswith(f"python -m sdft_jax.train --config={CONFIG}")


def test_batch_task_falls_back_to_the_task_index(tmp_path):
    env = {"BATCH_TASK_INDEX": "2", "BATCH_TASK_COUNT": "3",
           "BATCH_HOSTS_FILE": write_hosts(tmp_path, "vm-0", "vm-1", "vm-2")}
    proc = launch(tmp_path, "batch_task.sh", "--dry-run", "--", "true", env=env)
    assert "using BATCH_TASK_INDEX 2" in proc.stderr
    assert "SDFT_COORDINATOR=vm-0:8482 SDFT_NUM_PROCESSES=3 SDFT_PROCESS_ID=2" in commands(proc)[-1]


def test_batch_task_checks_the_hosts_file(tmp_path):
    env = {"BATCH_TASK_INDEX": "0", "BATCH_TASK_COUNT": "3", "BATCH_HOSTS_FILE": write_hosts(tmp_path, "a", "b")}
    proc = launch(tmp_path, "batch_task.sh", "--dry-run", "--", "true", env=env, check=False)
    assert proc.returncode != 0 and "lists 2 hosts for 3 tasks" in proc.stderr
    proc = launch(tmp_path, "batch_task.sh", "--dry-run", "--", "true", check=False,
                  env={"BATCH_TASK_INDEX": "0", "BATCH_TASK_COUNT": "2"})
    assert proc.returncode != 0 and "needs requireHostsFile" in proc.stderr


def test_batch_task_single_vm_sets_no_coordinator(tmp_path):
    proc = launch(tmp_path, "batch_task.sh", "--dry-run", "--", "true", env={"BATCH_TASK_COUNT": "1"})
    assert "SDFT_COORDINATOR" not in proc.stdout


# --- worker.sh, for real on local directories -------------------------------------------------------

def test_worker_stages_runs_logs_and_propagates_the_exit_status(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_text("w")
    dest, log, uploaded = tmp_path / "stage" / "model", tmp_path / "logs" / "run.log", tmp_path / "uploaded"
    code = "import os, sys; print('offline', os.environ['HF_HUB_OFFLINE'], sorted(os.listdir(sys.argv[1]))); sys.exit(3)"
    proc = launch(tmp_path, "worker.sh", "--stage", f"{src}={dest}", "--log", str(log), "--upload-log", str(uploaded),
                  "--", "python3", "-c", code, str(dest), check=False)
    assert proc.returncode == 3
    assert "offline 1 ['.staged', 'weights.bin']" in proc.stdout
    text = log.read_text()
    assert "offline 1" in text and text.endswith("exit status 3\n")
    assert (uploaded / f"{socket.gethostname()}.log").read_text() == text
    # Staged once: a restarted run does not copy again.
    (src / "weights.bin").write_text("changed")
    launch(tmp_path, "worker.sh", "--stage", f"{src}={dest}", "--", "true")
    assert (dest / "weights.bin").read_text() == "w"


def test_worker_refuses_other_code(tmp_path):
    proc = launch(tmp_path, "worker.sh", "--expect-revision", "abc123", "--", "true", check=False)
    assert proc.returncode != 0
    assert "this launch expects abc123" in proc.stderr and "run the install step again" in proc.stderr


def test_worker_needs_a_command(tmp_path):
    proc = launch(tmp_path, "worker.sh", "--stage", "a=b", check=False)
    assert proc.returncode != 0 and "no command" in proc.stderr
