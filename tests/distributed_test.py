"""Joining several processes, host blocks of the batch, global arrays; and a real 2-process training run.

The multi-process tests start real processes on localhost (CPU devices, gloo collectives): two
processes of 2 fake devices each must train exactly like one process of 4 devices, and a process whose
peer never starts must fail with a clear error within its timeout instead of hanging.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from sdft_jax import distributed
from sdft_jax.distributed import DataShard, DistributedConfig, DistributedError
from sdft_jax.models.sharding import make_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost" / "train_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def subprocess_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    # Unoptimised XLA:CPU code compiles faster, and these runs are compile-bound; both
    # sides of every comparison use the same flags.
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    for name in list(env):
        if name.startswith("SDFT_"):
            del env[name]
    return env


# --- Config -----------------------------------------------------------------------------------------

def test_config_from_the_environment_and_explicit_values():
    env = {"SDFT_COORDINATOR": "10.0.0.2:9000", "SDFT_NUM_PROCESSES": "4", "SDFT_PROCESS_ID": "3",
           "SDFT_INIT_TIMEOUT_S": "60", "SDFT_CLUSTER_DETECTION": "never"}
    cfg = DistributedConfig().resolve(env)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("10.0.0.2:9000", 4, 3)
    assert cfg.initialization_timeout_s == 60 and cfg.cluster_detection == "never" and cfg.multi_process
    # Explicit values (flags) win over the environment; None means "not given".
    cfg = DistributedConfig(process_id=1, coordinator_address=None).resolve(env)
    assert cfg.process_id == 1 and cfg.coordinator_address == "10.0.0.2:9000"
    assert DistributedConfig().resolve({}) == DistributedConfig(initialization_timeout_s=300, cluster_detection="auto")
    assert not DistributedConfig().resolve({"SDFT_NUM_PROCESSES": "1"}).multi_process


def test_config_fields_left_unset_come_from_the_environment():
    # A config file sets what it knows; the launcher's SDFT_* variables fill in the rest.
    cfg = DistributedConfig(process_id=0, initialization_timeout_s=30)
    env = {"SDFT_PROCESS_ID": "5", "SDFT_NUM_PROCESSES": "8", "SDFT_INIT_TIMEOUT_S": "9"}
    resolved = cfg.resolve(env)
    assert (resolved.process_id, resolved.num_processes, resolved.initialization_timeout_s) == (0, 8, 30)
    assert resolved.cluster_detection == "auto" and resolved.coordinator_address is None


@pytest.mark.parametrize("kwargs, match", [
    ({"num_processes": 0}, "num_processes"),
    ({"process_id": -1}, "process_id"),
    ({"num_processes": 2, "process_id": 2}, "not below"),
    ({"initialization_timeout_s": 0}, "initialization_timeout_s"),
    ({"cluster_detection": "sometimes"}, "cluster_detection"),
    ({"coordinator_address": "host:http"}, "port"),
    ({"coordinator_address": ":8000"}, "no host"),
    ({"cpu_collectives": "nccl"}, "cpu_collectives"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistributedConfig(**kwargs)


def test_config_resolve_names_a_bad_variable():
    with pytest.raises(ValueError, match="SDFT_NUM_PROCESSES='two'"):
        DistributedConfig().resolve({"SDFT_NUM_PROCESSES": "two"})


@pytest.mark.parametrize("address, expected", [
    ("localhost:1234", ("localhost", 1234)),
    ("10.1.2.3", ("10.1.2.3", distributed.DEFAULT_PORT)),
    ("[::1]:99", ("::1", 99)),
    ("fe80::1", ("fe80::1", distributed.DEFAULT_PORT)),
])
def test_split_address(address, expected):
    assert distributed.split_address(address) == expected


def test_single_process_does_not_initialize():
    assert distributed.maybe_initialize(DistributedConfig(cluster_detection="never"), environ={}) is False
    assert distributed.maybe_initialize(DistributedConfig(num_processes=1), environ={}) is False
    assert distributed.maybe_initialize(None, environ={"SDFT_NUM_PROCESSES": "1"}) is False
    assert not jax.distributed.is_initialized()
    assert distributed.is_primary()


def test_multi_process_config_needs_coordinator_and_id():
    with pytest.raises(DistributedError, match=r"coordinator_address \(or SDFT_COORDINATOR\) and process_id"):
        distributed.maybe_initialize(DistributedConfig(num_processes=2), environ={})
    with pytest.raises(DistributedError, match=r"num_processes=4 also needs process_id \(or SDFT_PROCESS_ID\)"):
        distributed.maybe_initialize(None, environ={"SDFT_NUM_PROCESSES": "4", "SDFT_COORDINATOR": "h:1"})


def test_a_rendezvous_failure_is_a_distributed_error_naming_the_setting():
    with socket.create_server(("", 0)) as taken:
        port = taken.getsockname()[1]
        cfg = DistributedConfig(coordinator_address=f"localhost:{port}", num_processes=2, process_id=0,
                                initialization_timeout_s=1)
        with pytest.raises(DistributedError, match=r"choose another port in the coordinator address \(SDFT_COORDINATOR\)"):
            distributed.maybe_initialize(cfg, environ={})
    assert not jax.distributed.is_initialized()


# --- Host blocks of the batch and global arrays (one process, 8 fake devices) -----------------------

@pytest.mark.parametrize("rows_of, n, expected", [
    ({0: {0, 1}, 1: {2, 3}}, 4, {0: (0, 2), 1: (1, 2)}),          # one block each
    ({0: {0, 1, 2, 3}, 1: {0, 1, 2, 3}}, 4, {0: (0, 1), 1: (0, 1)}),  # replicas share the only block
    ({0: {0}, 1: {0}, 2: {1}, 3: {1}}, 2, {0: (0, 2), 1: (0, 2), 2: (1, 2), 3: (1, 2)}),
    ({0: {2, 3}, 1: {0, 1}}, 4, {0: (1, 2), 1: (0, 2)}),          # blocks follow the rows, not the ids
])
def test_blocks_of_processes(rows_of, n, expected):
    got = {p: distributed.data_shard_from_rows(rows_of, n, p, {"fsdp": n}) for p in rows_of}
    assert got == {p: DataShard(index=i, count=c) for p, (i, c) in expected.items()}


@pytest.mark.parametrize("rows_of", [
    {0: {0, 2}, 1: {1, 3}},  # interleaved rows: no contiguous block
    {0: {0}, 1: {1, 2, 3}},  # unequal blocks
])
def test_blocks_that_do_not_tile_are_refused(rows_of):
    with pytest.raises(DistributedError, match="contiguous, equal block"):
        distributed.data_shard_from_rows(rows_of, 4, 0, {"fsdp": 4})


def test_data_shard_rows():
    assert DataShard(index=1, count=2).rows(8) == slice(4, 8)
    with pytest.raises(ValueError, match="does not split into 3"):
        DataShard(index=0, count=3).rows(8)


def test_global_batch_on_one_process_is_a_sharded_device_put():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert distributed.data_shard(mesh) == DataShard(index=0, count=1)
    local = {"tokens": np.arange(24, dtype=np.int32).reshape(8, 3), "mask": np.ones((8, 3), bool)}
    out = distributed.global_batch(local, mesh)
    for name, x in out.items():
        assert x.shape == local[name].shape and x.dtype == local[name].dtype
        assert x.sharding.spec == PartitionSpec(("data", "fsdp"))
        np.testing.assert_array_equal(distributed.to_host(x), local[name])
    assert distributed.global_batch(local, None)["tokens"].sharding.is_fully_replicated
    with pytest.raises(ValueError, match="6 global rows do not split over the 4 batch shards"):
        distributed.global_batch({"x": np.zeros((6, 2))}, mesh)


def test_agree_max_on_one_process():
    assert distributed.agree_max([3, 7]) == (3, 7)


# --- Real processes ---------------------------------------------------------------------------------

def wait_all(procs, timeout_s):
    """(returncode, output) of each process; kills them all if any is still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outputs.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"processes still running after {timeout_s} s")
    return outputs


def spawn(args, devices, **kwargs):
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=subprocess_env(devices), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """The same steps run as 2 processes x 2 devices and as 1 process x 4 devices, at the same time."""
    model = tiny_model_dir("llama")
    common = ["--model", model, "--mesh", "fsdp=2,tensor=2", "--steps", "2", "--checkpoint"]
    single = tmp_path_factory.mktemp("single")
    multi = tmp_path_factory.mktemp("multi")
    coordinator = f"localhost:{free_port()}"
    procs = [spawn([*common, "--out", str(single)], devices=4)]
    procs += [spawn([*common, "--out", str(multi), "--coordinator", coordinator, "--num_processes", "2",
                     "--process_id", str(i), "--timeout", "120"], devices=2) for i in range(2)]
    results = wait_all(procs, timeout_s=400)
    for name, (rc, out) in zip(("1 process", "process 0 of 2", "process 1 of 2"), results):
        assert rc == 0, f"{name} failed:\n{out[-5000:]}"
    return single, multi


@pytest.mark.slow
def test_two_processes_train_like_one(two_runs):
    single, multi = (np.load(d / "result.npz") for d in two_runs)
    assert (int(single["process_count"]), int(multi["process_count"])) == (1, 2)
    assert int(single["device_count"]) == int(multi["device_count"]) == 4
    assert set(single.files) == set(multi.files)
    # Same program over the same 4 devices: equal up to the summation order of the cross-process
    # collectives, which here turns out to be exact; any real divergence is far larger.
    np.testing.assert_array_equal(multi["losses"], single["losses"])
    assert len(single["losses"]) == 3  # 2 steps, then one more after the checkpoint round trip
    weights = [name for name in single.files if name.startswith(("['student']", "['teacher']"))]
    assert {name.split("]")[0] for name in weights} == {"['student'", "['teacher'"}
    for name in weights:
        np.testing.assert_array_equal(multi[name], single[name], err_msg=name)


@pytest.mark.slow
def test_two_processes_export_and_checkpoint_once(two_runs):
    from safetensors.numpy import load_file

    single, multi = two_runs
    for d in (single, multi):
        assert (d / "export" / "config.json").exists() and (d / "run" / "checkpoints" / "2").is_dir()
    a = load_file(str(single / "export" / "model.safetensors"))
    b = load_file(str(multi / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def join_alone(port: int, num_processes: int, process_id: int) -> subprocess.Popen:
    code = ("from sdft_jax import distributed as d; d.maybe_initialize(d.DistributedConfig("
            f"coordinator_address='localhost:{port}', num_processes={num_processes}, process_id={process_id}, "
            "initialization_timeout_s=3))")
    return subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(1), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_process_whose_peers_never_start_fails_clearly():
    # Process 0 of 2 alone, and process 2 of 3 without a coordinator: both exit with an error naming the
    # coordinator and who is missing, soon after their 3 s timeout, instead of hanging.
    port0, port2 = free_port(), free_port()
    start = time.monotonic()
    (rc0, out0), (rc2, out2) = wait_all([join_alone(port0, 2, 0), join_alone(port2, 3, 2)], timeout_s=60)
    assert time.monotonic() - start < 60
    assert rc0 != 0 and "DistributedError" in out0
    assert f"process 0 of 2 waited 3 s at coordinator localhost:{port0}, but process(es) [1] never joined" in out0
    assert rc2 != 0 and "DistributedError" in out2
    assert f"process 2 of 3 could not reach the coordinator localhost:{port2} (process 0) within 3 s" in out2


# --- The trainer as several processes ---------------------------------------------------------------

TRAINER_CONFIG = '''
from sdft_jax.testing.configs import tiny_config

def get_config():
    return tiny_config({model!r}, {run!r}, **{{"mesh.data": 2, "mesh.tensor": 2, "train.steps": 3,
                                              "checkpoint.every": 2}})
'''


def spawn_trainer(config_file, devices, **env):
    return subprocess.Popen([sys.executable, "-m", "sdft_jax.train", f"--config={config_file}"],
                            env={**subprocess_env(devices), **env}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_run_the_trainer_like_one(tmp_path, tiny_model_dir):
    """`python -m sdft_jax.train` as 2 processes x 2 devices (rollouts, steps, eval, checkpoints, export)
    ends exactly like 1 process x 4 devices: same rollouts, losses, evaluation and exported weights."""
    from safetensors.numpy import load_file

    from sdft_jax.metrics import read_metrics

    model = tiny_model_dir("llama")
    runs = {}
    for name in ("single", "multi"):
        runs[name] = tmp_path / name
        (tmp_path / f"{name}.py").write_text(TRAINER_CONFIG.format(model=model, run=str(runs[name])))
    coordinator = f"localhost:{free_port()}"
    procs = [spawn_trainer(tmp_path / "single.py", 4)]
    procs += [spawn_trainer(tmp_path / "multi.py", 2, SDFT_COORDINATOR=coordinator, SDFT_NUM_PROCESSES="2",
                            SDFT_PROCESS_ID=str(i), SDFT_INIT_TIMEOUT_S="120") for i in range(2)]
    for name, (rc, out) in zip(("1 process", "process 0 of 2", "process 1 of 2"), wait_all(procs, 500)):
        assert rc == 0, f"{name} failed:\n{out[-5000:]}"
    single, multi = (read_metrics(str(runs[n])) for n in ("single", "multi"))
    steps = [r for r in single if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    compared = ("loss", "kl", "grad_norm", "completion_tokens", "rollout/mean_length", "eval/capitals/accuracy")
    for a, b in zip(single, multi, strict=True):
        assert {k: a[k] for k in compared if k in a} == {k: b[k] for k in compared if k in b}, (a, b)
    for name in ("summary.json", "eval/step_000003/capitals.jsonl"):
        assert (runs["single"] / name).read_text() == (runs["multi"] / name).read_text().replace("multi", "single")
    a = load_file(str(runs["single"] / "export" / "model.safetensors"))
    b = load_file(str(runs["multi"] / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert sorted(os.listdir(runs["multi"] / "checkpoints")) == ["2", "3"]


def test_put_places_host_values_like_device_put_and_keeps_key_types():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = np.arange(24, dtype=np.int32).reshape(8, 3)
    sharding = jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    placed = distributed.put(x, sharding)
    assert placed.sharding == sharding
    np.testing.assert_array_equal(np.asarray(placed), x)
    key = jax.random.fold_in(jax.random.key(3), 7)
    placed_key = distributed.put(key, jax.sharding.NamedSharding(mesh, PartitionSpec()))
    assert jax.dtypes.issubdtype(placed_key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.uniform(placed_key, (4,)), jax.random.uniform(key, (4,)))
