"""Check an accelerate launch config and print the global batch it gives a training config.

A training config sizes the batch per process (`optim.batch_size`); the launch config decides how many processes
there are. This prints what one optimizer step sees, so that moving a recipe from 8 GPUs to 2 machines x 8 (or
to a SLURM job of another size) keeps the batch the paper trained with, or changes it on purpose:

    python recipes/global_batch.py recipes/configs/real/qwen2_vl_2b_stage2_mmeb.yaml \
        recipes/accelerate/multi_node_ddp.yaml
    python recipes/global_batch.py CONFIG ACCEL_CONFIG optim.batch_size=64     # the overrides the run will get
    python recipes/global_batch.py CONFIG ACCEL_CONFIG --num_machines 4 --num_processes 32   # as a launch overrides

Paths inside the launch config (DeepSpeed JSON, hostfile) are read relative to the working directory, as
`accelerate launch` reads them: run it from the checkout's root. Exit status 2 and a message naming the file and
key when the launch config is inconsistent (processes not divisible by machines, a missing or malformed DeepSpeed
file, a hostfile that disagrees with the machine and process counts) or refuses the training config (GradCache
under DeepSpeed ZeRO-2/3).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from accelerate.utils.constants import DEEPSPEED_MULTINODE_LAUNCHERS

from unime.errors import ConfigError
from unime.losses import RERANK_LOSSES
from unime.train.config import TrainConfig, load_train_config

# DeepSpeed's own hostfile grammar (deepspeed.launcher.runner._parse_hostfile): "<host> slots=<n>", '#' comments.
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")


@dataclass(frozen=True)
class LaunchShape:
    """What an accelerate config launches: how many machines and processes, on which backend."""

    path: str
    """The accelerate config file."""
    distributed_type: str
    """accelerate's `DistributedType` value (NO, MULTI_GPU, DEEPSPEED, ...)."""
    num_machines: int
    """Machines taking part."""
    num_processes: int
    """Processes over all machines (accelerate starts num_processes / num_machines on each)."""
    zero_stage: int | None = None
    """The DeepSpeed ZeRO stage of the config's DeepSpeed JSON; None without DeepSpeed."""
    hostfile: dict[str, int] | None = None
    """The DeepSpeed hostfile's hosts and slots, when the config launches through one."""

    @property
    def processes_per_machine(self) -> int:
        return self.num_processes // self.num_machines


@dataclass(frozen=True)
class GlobalBatch:
    """The batch arithmetic of one (training config, launch config) pair."""

    per_device: int
    """`optim.batch_size`: examples (queries) per process per micro-step."""
    processes: int
    """Processes over all machines."""
    accumulation: int
    """`optim.gradient_accumulation_steps`: micro-steps per optimizer step."""
    pairs_per_query: int | None
    """A reranker's (query, document) pairs per query (positive + mined + random negatives); None for an embedder."""

    @property
    def contrastive(self) -> int:
        """Queries gathered from all processes into one in-batch contrastive loss (one micro-step)."""
        return self.per_device * self.processes

    @property
    def examples_per_step(self) -> int:
        """Examples per optimizer step: per-device batch x processes x accumulation (DeepSpeed's train_batch_size)."""
        return self.per_device * self.processes * self.accumulation


def read_launch(path: str | Path, num_machines: int | None = None, num_processes: int | None = None) -> LaunchShape:
    """Load an accelerate config with accelerate's own reader and check that its counts and files agree.

    `num_machines`/`num_processes` stand for the `accelerate launch` flags of the same names, which win over the
    file (recipes/slurm/launch_node.sh passes them from the SLURM job).
    """
    path = str(path)
    try:
        cluster = load_config_from_file(path)
    except (ValueError, TypeError) as error:  # unknown keys, a bad distributed_type
        raise ConfigError(f"{path}: {error}") from error
    machines = num_machines if num_machines is not None else cluster.num_machines
    processes = num_processes if num_processes is not None else cluster.num_processes
    kind = DistributedType(cluster.distributed_type)
    if processes < 1:
        raise ConfigError(f"{path}: num_processes must be set to the processes over all machines, got {processes}")
    if machines < 1 or processes % machines:
        raise ConfigError(
            f"{path}: num_processes ({processes}) must be a multiple of num_machines ({machines}): accelerate starts "
            "num_processes / num_machines processes on each machine"
        )
    if not 0 <= cluster.machine_rank < machines:
        raise ConfigError(f"{path}: machine_rank {cluster.machine_rank} is not in 0..{machines - 1}")
    if kind == DistributedType.NO and processes != 1:
        raise ConfigError(f"{path}: distributed_type NO runs one process, got num_processes {processes}")
    if kind == DistributedType.MULTI_GPU and processes < 2:
        raise ConfigError(f"{path}: distributed_type MULTI_GPU needs num_processes >= 2, got {processes}")
    if kind != DistributedType.DEEPSPEED:
        return LaunchShape(path, kind.value, machines, processes)
    settings = cluster.deepspeed_config
    zero_stage = deepspeed_zero_stage(path, settings)
    hostfile = None
    launcher = settings.get("deepspeed_multinode_launcher", DEEPSPEED_MULTINODE_LAUNCHERS[0])
    if launcher not in DEEPSPEED_MULTINODE_LAUNCHERS:
        raise ConfigError(
            f"{path}: deepspeed_multinode_launcher {launcher!r} is not one of {DEEPSPEED_MULTINODE_LAUNCHERS}"
        )
    if machines > 1 and launcher != "standard":  # accelerate hands the launch to `deepspeed --hostfile ...`
        hostfile = check_hostfile(path, settings.get("deepspeed_hostfile"), machines, processes // machines)
    return LaunchShape(path, kind.value, machines, processes, zero_stage, hostfile)


def deepspeed_zero_stage(path: str, settings: dict) -> int:
    """The ZeRO stage of the DeepSpeed JSON a config names; the file must exist and parse."""
    name = settings.get("deepspeed_config_file")
    if not name:
        raise ConfigError(f"{path}: deepspeed_config.deepspeed_config_file is missing")
    if "mixed_precision" in (yaml.safe_load(Path(path).read_text()) or {}):
        raise ConfigError(f"{path}: accelerate refuses mixed_precision beside a DeepSpeed config file; remove the key")
    try:
        config = json.loads(Path(name).read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: deepspeed_config_file {name} does not exist (relative to {Path.cwd()})") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: deepspeed_config_file {name} is not JSON: {error}") from error
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{name}: zero_optimization.stage must be 0-3, got {stage!r}")
    return stage


def check_hostfile(path: str, name: str | None, machines: int, per_machine: int) -> dict[str, int]:
    """Read a DeepSpeed hostfile and check it has `machines` hosts of `per_machine` slots each."""
    if not name:
        raise ConfigError(
            f"{path}: {machines} machines through DeepSpeed's launcher need deepspeed_config.deepspeed_hostfile "
            "(or deepspeed_multinode_launcher: standard, which runs accelerate launch on every machine)"
        )
    hosts = parse_hostfile(name)
    if len(hosts) != machines or set(hosts.values()) != {per_machine}:
        raise ConfigError(
            f"{path}: hostfile {name} lists {len(hosts)} host(s) with slots {list(hosts.values())}, but the config "
            f"launches {machines} machine(s) x {per_machine} process(es)"
        )
    return hosts


def parse_hostfile(name: str | Path) -> dict[str, int]:
    """A DeepSpeed hostfile as {host: slots}, in file order; a malformed or repeated line is an error naming it."""
    try:
        lines = Path(name).read_text().splitlines()
    except FileNotFoundError as error:
        raise ConfigError(f"hostfile {name} does not exist (relative to {Path.cwd()})") from error
    hosts: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if match is None or match.group(1) in hosts:
            problem = "a repeated host" if match else "expected '<host> slots=<n>'"
            raise ConfigError(f"{name}:{number}: {problem}, got {line!r}")
        hosts[match.group(1)] = int(match.group(2))
    if not hosts:
        raise ConfigError(f"{name}: no hosts")
    return hosts


def global_batch(config: TrainConfig, launch: LaunchShape) -> GlobalBatch:
    """The batch one optimizer step sees; refuses GradCache under ZeRO-2/3 as the training loop does at start."""
    chunk = config.optim.gradcache_chunk_size
    if launch.zero_stage is not None and launch.zero_stage >= 2 and chunk is not None:
        raise ConfigError(
            f"optim.gradcache_chunk_size={chunk}: GradCache is refused under DeepSpeed ZeRO-{launch.zero_stage} "
            f"({launch.path}); pass optim.gradcache_chunk_size=null (and a per-device batch that fits) or use DDP"
        )
    pairs = None
    if config.loss.name in RERANK_LOSSES:
        pairs = 1 + config.data.num_negatives + config.data.random_negatives
    return GlobalBatch(config.optim.batch_size, launch.num_processes, config.optim.gradient_accumulation_steps, pairs)


def describe(launch: LaunchShape, batch: GlobalBatch) -> list[str]:
    """The lines `main` prints."""
    lines = [
        f"launch: {launch.distributed_type}"
        + (f" ZeRO-{launch.zero_stage}" if launch.zero_stage is not None else "")
        + f", {launch.num_machines} machine(s) x {launch.processes_per_machine} process(es) = {launch.num_processes}",
    ]
    if launch.hostfile is not None:
        lines.append("hostfile: " + ", ".join(f"{host} slots={slots}" for host, slots in launch.hostfile.items()))
    b = batch
    lines.append(f"per-device batch: {b.per_device}; gradient accumulation: {b.accumulation}")
    if b.pairs_per_query is None:
        lines.append(f"contrastive batch (gathered over processes): {b.per_device} x {b.processes} = {b.contrastive}")
    lines.append(
        f"global batch (examples per optimizer step): {b.per_device} x {b.processes} x {b.accumulation}"
        f" = {b.examples_per_step}"
    )
    if b.pairs_per_query is not None:
        lines.append(
            f"reranker pairs per optimizer step: {b.examples_per_step} x {b.pairs_per_query}"
            f" = {b.examples_per_step * b.pairs_per_query}"
        )
    return lines


def main(argv: list[str] | None = None) -> GlobalBatch:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("accelerate_config", help="accelerate config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the training config")
    parser.add_argument("--num_machines", type=int, help="as `accelerate launch --num_machines` (wins over the file)")
    parser.add_argument("--num_processes", type=int, help="as `accelerate launch --num_processes`")
    args = parser.parse_args(argv)
    try:
        launch = read_launch(args.accelerate_config, args.num_machines, args.num_processes)
        batch = global_batch(load_train_config(args.config, args.overrides), launch)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print("\n".join([f"config: {args.config}", *describe(launch, batch)]))
    return batch


if __name__ == "__main__":
    main(sys.argv[1:])
