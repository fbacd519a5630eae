"""The launch configs (recipes/accelerate/, the DeepSpeed hostfile, the SLURM scripts) agree with each other and
with what accelerate and DeepSpeed themselves make of them, and recipes/global_batch.py prints the right batch.

accelerate's own reader loads every config; accelerate's own launch-argument handling turns each into the
per-machine process counts, node rank and rendezvous address it would start; DeepSpeed's own parser reads the
hostfile. The batch arithmetic is checked against the raw YAML and against the sizes the real configs' comments
promise. The slow test runs recipes/slurm/launch_node.sh as two machines on the loopback interface.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from deepspeed.launcher.runner import _parse_hostfile

from unime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
MULTI_NODE = [p for p in ACCELERATE if p.name.startswith("multi_node_")]
REAL = sorted((ROOT / "recipes" / "configs" / "real").glob("*.yaml"))
SLURM = ROOT / "recipes" / "slurm"
MAIN_IP = "192.0.2.10"  # reserved for documentation (RFC 5737): nothing is contacted


def _load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


global_batch = _load_recipe("global_batch")


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Paths inside the configs are relative to the checkout's root, as `accelerate launch` reads them."""
    monkeypatch.chdir(ROOT)
    return ROOT


def accelerate_plan(config: Path, *flags: str) -> tuple[object, list[str] | None, dict[str, str]]:
    """What `accelerate launch --config_file CONFIG FLAGS script.py` would start, computed by accelerate, run by nobody.

    Returns accelerate's resolved arguments, the `deepspeed ...` command it would run (None where it runs torchrun
    itself) and the environment it would give the processes.
    """
    args = launch_command_parser().parse_args(["--config_file", str(config), *flags, "recipes/train_embedder.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        # As accelerate's launch_command does before handing over to its DeepSpeed launcher.
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        command, env = prepare_deepspeed_cmd_env(args)
        return args, command, env
    return args, None, prepare_multi_gpu_env(args)


def test_there_are_multi_node_configs_for_ddp_and_deepspeed() -> None:
    kinds = {yaml.safe_load(p.read_text())["distributed_type"] for p in MULTI_NODE}
    assert kinds == {"MULTI_GPU", "DEEPSPEED"}
    assert (ROOT / "recipes" / "deepspeed" / "hostfile.example").is_file()


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_every_accelerate_config_loads_with_accelerate_and_is_consistent(path: Path, at_root: Path) -> None:
    cluster = ClusterConfig.from_yaml_file(str(path))  # accelerate's reader: unknown keys raise
    raw = yaml.safe_load(path.read_text())
    assert cluster.num_processes == raw["num_processes"] and cluster.num_machines == raw["num_machines"]
    assert cluster.num_processes % cluster.num_machines == 0 and 0 <= cluster.machine_rank < cluster.num_machines
    launch = global_batch.read_launch(path)
    assert launch.processes_per_machine * launch.num_machines == launch.num_processes
    if raw["distributed_type"] == "DEEPSPEED":
        name = raw["deepspeed_config"]["deepspeed_config_file"]
        assert launch.zero_stage == yaml.safe_load((ROOT / name).read_text())["zero_optimization"]["stage"]
        assert "mixed_precision" not in raw, "accelerate refuses mixed_precision beside a DeepSpeed config file"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_starts_what_the_config_says(path: Path, at_root: Path) -> None:
    launch = global_batch.read_launch(path)
    raw = yaml.safe_load(path.read_text())
    if launch.num_machines == 1:
        args, command, env = accelerate_plan(path)
        assert command is None and int(args.nproc_per_node) == launch.num_processes
        return
    # Machine 1 of 2, as an operator (or launch_node.sh) starts it: the same flags on every machine but the rank.
    args, command, env = accelerate_plan(path, "--machine_rank", "1", "--main_process_ip", MAIN_IP)
    # The file's rdzv_backend / same_network are the ones in effect (accelerate 1.15 takes both from flags only).
    assert args.rdzv_backend == raw.get("rdzv_backend", "static")
    assert args.same_network == raw.get("same_network", False)
    if launch.hostfile is not None:  # one `deepspeed --hostfile` from machine 0 reaches the others over ssh
        hostfile = raw["deepspeed_config"]["deepspeed_hostfile"]
        per_machine = str(launch.processes_per_machine)
        assert command[:7] == [
            "deepspeed",
            "--hostfile",
            hostfile,
            "--no_local_rank",
            "--launcher",
            "pdsh",
            "--num_gpus",
        ]
        assert command[7] == per_machine and command[-1] == "recipes/train_embedder.py"
        assert _parse_hostfile(Path(hostfile).read_text().splitlines()) == launch.hostfile
        assert len(launch.hostfile) == launch.num_machines
    else:  # torchrun on each machine
        assert command is None
        assert int(args.nproc_per_node) == launch.processes_per_machine
        assert (int(args.nnodes), args.node_rank) == (launch.num_machines, 1)
        assert args.rdzv_endpoint == f"{MAIN_IP}:{raw['main_process_port']}"
    if launch.zero_stage is not None:
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == raw["deepspeed_config"]["deepspeed_config_file"]


def expected_lines(config: Path, accelerate: Path, overrides: dict[str, object]) -> list[str]:
    """The arithmetic from the raw YAML files, independently of the tool's dataclasses."""
    optim = {**yaml.safe_load(config.read_text())["optim"], **overrides}
    data = yaml.safe_load(config.read_text()).get("data", {})  # a multi-task config keeps data per objective
    processes = yaml.safe_load(accelerate.read_text())["num_processes"]
    b, a = optim["batch_size"], optim.get("gradient_accumulation_steps", 1)
    step = b * processes * a
    lines = [f"global batch (examples per optimizer step): {b} x {processes} x {a} = {step}"]
    if "reranker" in config.name:
        pairs = 1 + data.get("num_negatives", 0) + data.get("random_negatives", 0)
        lines.append(f"reranker pairs per optimizer step: {step} x {pairs} = {step * pairs}")
    else:
        lines.append(f"contrastive batch (gathered over processes): {b} x {processes} = {b * processes}")
    return lines


@pytest.mark.parametrize("accelerate", ACCELERATE, ids=lambda p: p.name)
@pytest.mark.parametrize("config", REAL, ids=lambda p: p.stem)
def test_global_batch_of_every_real_config_under_every_launch_config(
    config: Path, accelerate: Path, at_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(config.relative_to(ROOT)), str(accelerate.relative_to(ROOT))]
    raw = yaml.safe_load(config.read_text())
    zero = yaml.safe_load(accelerate.read_text()).get("distributed_type") == "DEEPSPEED"
    overrides: dict[str, object] = {}
    if zero and raw["optim"].get("gradcache_chunk_size") is not None:  # refused, as the training loop refuses it
        with pytest.raises(SystemExit) as exit_info:
            global_batch.main(argv)
        assert exit_info.value.code == 2
        assert "optim.gradcache_chunk_size" in capsys.readouterr().err
        argv.append("optim.gradcache_chunk_size=null")
        overrides["gradcache_chunk_size"] = None
    global_batch.main(argv)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"config: {argv[0]}"
    for line in expected_lines(config, accelerate, overrides):
        assert line in printed, (line, printed)


def promised_sizes(config: Path) -> tuple[int, int] | None:
    """(GPUs, batch) from a real config's batch comment, e.g. `batch_size: 64  # per GPU; x 8 GPUs = 512`."""
    match = re.search(r"batch_size: \d+ +# per GPU; x (\d+) GPUs = (\d+)", config.read_text())
    return (int(match.group(1)), int(match.group(2))) if match else None


@pytest.mark.parametrize("config", REAL, ids=lambda p: p.stem)
def test_the_real_configs_comments_give_the_batch_their_launch_gives(config: Path, at_root: Path) -> None:
    header = config.read_text().split("\noutput_dir:", 1)[0]
    launch = global_batch.read_launch(header.split("--config_file ", 1)[1].split()[0])
    batch = global_batch.global_batch(global_batch.load_train_config(config), launch)
    if "reranker" in config.name:  # "2 queries x 17 pairs per GPU x 8 GPUs x 2 accumulation steps = 544 pairs"
        sizes = re.search(r"x (\d+) GPUs x \d+ accumulation steps = (\d+) pairs", header)
        assert sizes and launch.num_processes == int(sizes.group(1))
        assert batch.examples_per_step * batch.pairs_per_query == int(sizes.group(2))
        return
    promised = promised_sizes(config)
    if promised is not None:
        assert (launch.num_processes, batch.contrastive) == promised
    else:  # the late-interaction configs say "x 8 GPUs" without a total
        assert launch.num_processes == 8 and "x 8 GPUs" in config.read_text()


def test_hostfile_reads_as_deepspeeds_own_parser_reads_it(tmp_path: Path) -> None:
    good = "# a comment\n\nnode-a slots=8\n  node-b   slots=4  \n"
    (tmp_path / "good").write_text(good)
    assert global_batch.parse_hostfile(tmp_path / "good") == _parse_hostfile(good.splitlines())
    for text, message in [
        ("node-a slots=8\nnode-a slots=8\n", "2: a repeated host"),
        ("node-a slots=8\nnode-b 8\n", "2: expected '<host> slots=<n>'"),
        ("# only a comment\n", "no hosts"),
    ]:
        (tmp_path / "bad").write_text(text)
        with pytest.raises(ValueError):  # DeepSpeed refuses it too
            _parse_hostfile(text.splitlines())
        with pytest.raises(ConfigError, match=message):
            global_batch.parse_hostfile(tmp_path / "bad")


def write_launch(folder: Path, name: str, **settings: object) -> Path:
    base = {"compute_environment": "LOCAL_MACHINE", "num_machines": 2, "num_processes": 16, "main_process_port": 29500}
    path = folder / name
    path.write_text(yaml.safe_dump({**base, **settings}))
    return path


def test_inconsistent_launch_configs_are_refused_naming_the_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    (tmp_path / "broken.json").write_text('{"zero_optimization": ')
    (tmp_path / "hosts").write_text("a slots=8\nb slots=8\nc slots=8\n")
    ddp = {"distributed_type": "MULTI_GPU"}
    zero = {"distributed_type": "DEEPSPEED"}
    cases = [
        (dict(ddp, num_processes=15), r"odd.yaml: num_processes \(15\) must be a multiple of num_machines \(2\)"),
        (dict(ddp, machine_rank=2), r"odd.yaml: machine_rank 2 is not in 0..1"),
        (dict(ddp, num_processes=-1), "odd.yaml: num_processes must be set"),
        (dict(ddp, num_machine=2), r"odd.yaml: .*unknown keys \(\['num_machine'\]\)"),
        (dict(zero, deepspeed_config={}), "deepspeed_config.deepspeed_config_file is missing"),
        (dict(zero, deepspeed_config={"deepspeed_config_file": "nope.json"}), "nope.json does not exist"),
        (dict(zero, deepspeed_config={"deepspeed_config_file": "broken.json"}), "broken.json is not JSON"),
        (
            dict(zero, mixed_precision="bf16", deepspeed_config={"deepspeed_config_file": "zero2.json"}),
            "refuses mixed_precision beside a DeepSpeed config file",
        ),
        (
            dict(zero, deepspeed_config={"deepspeed_config_file": "zero2.json"}),
            "need deepspeed_config.deepspeed_hostfile",
        ),
        (
            dict(zero, deepspeed_config={"deepspeed_config_file": "zero2.json", "deepspeed_hostfile": "hosts"}),
            r"hostfile hosts lists 3 host\(s\) with slots \[8, 8, 8\], but the config launches 2 machine\(s\) x 8",
        ),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message):
            global_batch.read_launch(write_launch(tmp_path, "odd.yaml", **settings))
    # The flags of `accelerate launch` win over the file, as they do for accelerate.
    fine = write_launch(tmp_path, "fine.yaml", **ddp)
    assert global_batch.read_launch(fine, num_machines=4, num_processes=32).processes_per_machine == 8
    with pytest.raises(ConfigError, match=r"num_processes \(30\) must be a multiple of num_machines \(4\)"):
        global_batch.read_launch(fine, num_machines=4, num_processes=30)


def sbatch_option(name: str) -> int:
    match = re.search(rf"^#SBATCH --{name}=(\d+)$", (SLURM / "train.sbatch").read_text(), re.MULTILINE)
    assert match, f"train.sbatch has no #SBATCH --{name}"
    return int(match.group(1))


def test_the_sbatch_job_shape_matches_the_configs_it_launches(at_root: Path) -> None:
    text = (SLURM / "train.sbatch").read_text()
    nodes, gpus = sbatch_option("nodes"), sbatch_option("gpus-per-node")
    assert sbatch_option("ntasks-per-node") == 1, "one accelerate launch per machine"
    named = re.findall(r"sbatch (?:--nodes (\d+) )?recipes/slurm/train.sbatch (recipes/accelerate/\S+\.yaml)", text)
    assert {config for _, config in named} == {str(p.relative_to(ROOT)) for p in MULTI_NODE if "hostfile" not in p.name}
    for job_nodes, config in named:
        launch = global_batch.read_launch(config)
        if not job_nodes:  # the script's own job shape: the config's machines and processes as they are
            assert (nodes, nodes * gpus) == (launch.num_machines, launch.num_processes)
        assert launch.processes_per_machine == gpus
    assert "srun --ntasks-per-node=1" in text and "recipes/slurm/launch_node.sh" in text


def launch_node_flags(tmp_path: Path, env: dict[str, str], *args: str) -> list[str]:
    """The `accelerate launch` arguments launch_node.sh builds (an `accelerate` that prints them stands in)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "accelerate").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "accelerate").chmod(0o755)
    result = subprocess.run(
        ["bash", str(SLURM / "launch_node.sh"), *args],
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_launch_node_gives_accelerate_this_machines_rank_and_the_jobs_counts(tmp_path: Path, at_root: Path) -> None:
    job = {"SLURM_NNODES": "4", "SLURM_NODEID": "3", "GPUS_PER_NODE": "8", "MAIN_PROCESS_IP": MAIN_IP}
    config = "recipes/accelerate/multi_node_zero3.yaml"
    flags = launch_node_flags(tmp_path, job, config, "recipes/train_embedder.py", "--config", "a b.yaml")
    assert flags[0:2] == ["launch", "--config_file"] and flags[-3:] == [
        "recipes/train_embedder.py",
        "--config",
        "a b.yaml",
    ]
    # accelerate's own parser on those flags: 4 machines x 8, this one rank 3, rendezvous at machine 0.
    args = launch_command_parser().parse_args(flags[1:])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    command, _ = prepare_deepspeed_cmd_env(args)
    assert command is None  # torchrun here, not ssh from a hostfile
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "4", 3)
    assert args.rdzv_endpoint == f"{MAIN_IP}:29500"
    missing = subprocess.run(
        ["bash", str(SLURM / "launch_node.sh"), config, "x.py"],
        env={"PATH": os.environ["PATH"], "SLURM_NNODES": "2"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode != 0 and "SLURM_NODEID: not set" in missing.stderr


PROBE = """
import os
import torch
from accelerate import Accelerator

accelerator = Accelerator()
ranks = accelerator.gather(torch.tensor([accelerator.process_index])).tolist()
print(f"machine {os.environ['GROUP_RANK']} rank {accelerator.process_index} of {accelerator.num_processes} "
      f"{accelerator.distributed_type.value} gathered {ranks}", flush=True)
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # gloo aborts at interpreter exit otherwise
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_loopback_meet_through_launch_node(tmp_path: Path, at_root: Path) -> None:
    """launch_node.sh as machines 0 and 1 of a SLURM job: real accelerate launch, torchrun rendezvous, gloo."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",  # no GPU here: the processes join over gloo
        "SLURM_NNODES": "2",
        "GPUS_PER_NODE": "1",
        "MAIN_PROCESS_IP": "127.0.0.1",
        "MAIN_PROCESS_PORT": str(free_port()),
    }
    command = ["bash", str(SLURM / "launch_node.sh"), "recipes/accelerate/multi_node_ddp.yaml", str(probe)]
    machines = [
        subprocess.Popen(
            command,
            env={**env, "SLURM_NODEID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: the torchrun workers end with it
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for machine in machines:
            outputs.append(machine.communicate(timeout=240)[0])
    finally:
        for machine in machines:
            if machine.poll() is None:
                os.killpg(machine.pid, signal.SIGKILL)
    for rank, (machine, output) in enumerate(zip(machines, outputs, strict=True)):
        assert machine.returncode == 0, output[-3000:]
        assert f"machine {rank} rank {rank} of 2 MULTI_CPU gathered [0, 1]" in output, output[-3000:]
