"""SLURM script, torchrun command and distributed-environment parsing checks (no SLURM needed).

    pytest tests/unit/test_launch_scripts.py
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest

from launch.__main__ import main
from launch.env import expand_nodelist, first_host, read_dist_env
from launch.slurm import SlurmJob, render_sbatch, time_to_seconds
from launch.torchrun import executable_command, node_command

pytestmark = pytest.mark.timeout(120)


def _sbatch(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            out[key] = value
    return out


def _srun_words(text: str) -> list[str]:
    start = text.index("\nsrun ") + 1
    command = text[start:text.index(" &\n", start)].replace("\\\n", " ")
    return shlex.split(command)


def test_sbatch_script_content(tmp_path):
    job = SlurmJob(config="configs/pretrain.toml", nodes=4, gpus_per_node=8, partition="gpu", account="proj",
                   time="2-00:00:00", signal_lead_s=600, overrides=["--optim.lr=3e-4"])
    text = render_sbatch(job)
    assert text.startswith("#!/bin/bash\n")
    sb = _sbatch(text)
    assert sb["--nodes"] == "4" and sb["--ntasks-per-node"] == "1" and sb["--gpus-per-node"] == "8"
    assert sb["--partition"] == "gpu" and sb["--account"] == "proj" and sb["--time"] == "2-00:00:00"
    assert sb["--signal"] == "B:USR1@600" and "--requeue" in sb and sb["--open-mode"] == "append"
    assert sb["--output"] == "logs/%x-%j.out"
    assert 'LOG_DIR="logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"' in text
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in text
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text and "OMP_NUM_THREADS=" in text
    assert "export TORCH_FR_BUFFER_SIZE=2000" in text and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in text
    assert "TORCH_NCCL_BLOCKING_WAIT" not in text.split("#SBATCH")[-1].split("\n", 1)[1]
    words = _srun_words(text)
    assert words[0] == "srun" and "--ntasks-per-node=1" in words
    run = words[words.index("torchrun"):]
    assert "--rdzv-backend=c10d" in run and "--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" in run
    assert "--rdzv-id=$SLURM_JOB_ID" in run and "--nnodes=$SLURM_NNODES" in run
    assert any(w.startswith("--signals-to-handle=") and "SIGUSR1" in w for w in run)
    assert "--shutdown-timeout=540" in run
    train = run[run.index("-m"):]
    assert train[:4] == ["-m", "train", "--config", "configs/pretrain.toml"]
    assert "--optim.lr=3e-4" in train and train[-2:] == ["--resume", "auto"]
    assert "trap on_usr1 USR1" in text and 'kill -USR1 "$SRUN_PID"' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text


def test_sbatch_cpu_only_and_bash_syntax(tmp_path):
    job = SlurmJob(config="c.toml", nodes=1, gpus_per_node=0, nproc_per_node=2, time="00:10:00",
                   signal_lead_s=120)
    text = render_sbatch(job)
    assert "--gpus-per-node" not in text and "NPROC_PER_NODE=2" in text
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in text and "NCCL" not in text  # gloo: no CUDA/NCCL env
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    for script in (text, render_sbatch(SlurmJob(config="a b.toml", nodes=2, overrides=["--x.y=$HOME"]))):
        path = tmp_path / "job.sbatch"
        path.write_text(script)
        result = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    # user values are single-quoted (not expanded by the shell); our $VAR templates are expanded
    assert "'--x.y=$HOME'" in script and "'a b.toml'" in script


def test_sbatch_validation():
    with pytest.raises(ValueError, match="signal-lead"):
        render_sbatch(SlurmJob(config="c", time="00:05:00", signal_lead_s=600))
    assert time_to_seconds("1-02:03:04") == 93784 and time_to_seconds("30") == 1800
    assert time_to_seconds("01:30:00") == 5400 and time_to_seconds("2-12") == 216000
    with pytest.raises(ValueError):
        time_to_seconds("soon")


def test_slurm_cli_writes_script(tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    assert main(["slurm", "--config", "c.toml", "--nodes", "2", "--gpus-per-node", "8", "--output", str(out),
                 "--log-root", str(tmp_path / "logs"), "--", "--train.steps=10"]) == 0
    assert out.exists() and "--train.steps=10" in out.read_text()
    assert (tmp_path / "logs").is_dir()
    assert main(["slurm", "--config", "c.toml", "--nodes", "2", "--gpus-per-node", "8", "--time", "00:01:00",
                 "--output", str(out)]) == 2


def test_torchrun_node_commands():
    cmds = [node_command(config="c.toml", nproc_per_node=8, nodes=2, node_rank=r, master="10.0.0.1:29500",
                         environ={}) for r in (0, 1)]
    for rank, cmd in enumerate(cmds):
        assert cmd[0] == "torchrun" and "--nnodes=2" in cmd and "--nproc-per-node=8" in cmd
        assert "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=10.0.0.1:29500" in cmd
        assert "--rdzv-id=llama" in cmd and f"--rdzv-conf=is_host={int(rank == 0)}" in cmd
        assert not any(w.startswith("--node-rank") for w in cmd)  # torchrun ignores it under c10d
        assert "--max-restarts=0" in cmd
        assert cmd[-6:] == ["-m", "train", "--config", "c.toml", "--resume", "auto"]
    static = node_command(config="c.toml", nproc_per_node=8, nodes=2, node_rank=1, master="10.0.0.1:29500",
                          rdzv="static", max_restarts=3, environ={})
    assert "--node-rank=1" in static and "--master-addr=10.0.0.1" in static and "--master-port=29500" in static
    assert "--max-restarts=3" in static and not any("rdzv" in w for w in static)
    single = node_command(config="c.toml", nproc_per_node=2, environ={})
    assert "--standalone" in single and "--nnodes=1" in single and not any("rdzv" in w for w in single)
    slurm_env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "3", "SLURM_NNODES": "3", "SLURM_NODEID": "1",
                 "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[017-019]", "SLURM_JOB_ID": "4242"}
    cmd = node_command(config="c.toml", nproc_per_node=4, environ=slurm_env)
    assert "--nnodes=3" in cmd and "--rdzv-conf=is_host=0" in cmd and "--rdzv-endpoint=gpu017:29500" in cmd
    assert "--rdzv-id=4242" in cmd
    mpi_env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "MASTER_ADDR": "head", "MASTER_PORT": "1234"}
    cmd = node_command(config="c.toml", nproc_per_node=8, environ=mpi_env, rdzv="static")
    assert "--nnodes=4" in cmd and "--node-rank=2" in cmd and "--master-port=1234" in cmd
    assert "--rdzv-endpoint=head:1234" in node_command(config="c.toml", nproc_per_node=8, environ=mpi_env)
    with pytest.raises(ValueError, match="node-rank"):
        node_command(config="c.toml", nproc_per_node=1, nodes=2, environ={})
    with pytest.raises(ValueError, match="HOST:PORT"):
        node_command(config="c.toml", nproc_per_node=1, nodes=2, node_rank=0, master="nohost", environ={})
    with pytest.raises(ValueError, match="max-restarts"):
        node_command(config="c.toml", nproc_per_node=1, max_restarts=-1, environ={})
    assert executable_command(cmds[0])[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert executable_command(cmds[0])[3:] == cmds[0][1:]


def test_torchrun_cli(capsys):
    assert main(["torchrun", "--config", "c.toml", "--nodes", "2", "--node-rank", "1",
                 "--master", "10.1.2.3:29400", "--nproc-per-node", "8", "--max-restarts", "2", "--",
                 "--zero.stage=2"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[1] == "torchrun" and "--rdzv-endpoint=10.1.2.3:29400" in words
    assert "--rdzv-conf=is_host=0" in words and "--max-restarts=2" in words and "--zero.stage=2" in words
    assert words[0] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # restarts need one rendezvous store per attempt
    assert main(["torchrun", "--config", "c.toml", "--nodes", "2", "--node-rank", "5",
                 "--master", "h:1"]) == 2
    assert main(["torchrun", "--config", "c.toml", "--", "zero.stage=2"]) == 2  # not --section.key=value


def test_nodelist_parsing():
    assert first_host("node[001-004,007]") == "node001"
    assert first_host("gpu7,gpu[1-2]") == "gpu7"
    assert first_host("r[3-4]n[09-10]") == "r3n09"
    assert expand_nodelist("node[001-003,007],login1") == ["node001", "node002", "node003", "node007", "login1"]
    assert expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_nodelist("a[08-10]") == ["a08", "a09", "a10"]


def test_read_dist_env_sources():
    env = read_dist_env({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                         "GROUP_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29501",
                         "SLURM_PROCID": "0"})  # torchrun wins over the enclosing srun task
    assert (env.source, env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == \
        ("torchrun", 5, 1, 16, 4, 1)
    assert (env.master_addr, env.master_port, env.num_nodes) == ("n0", 29501, 4)
    env = read_dist_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
                         "SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "4(x4)",
                         "SLURM_JOB_NODELIST": "node[001-004,007]"})
    assert (env.source, env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == \
        ("slurm", 9, 1, 16, 4, 2)
    assert env.master_addr == "node001" and env.master_port == 29500
    env = read_dist_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (env.source, env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == \
        ("openmpi", 3, 1, 8, 2, 1)
    env = read_dist_env({})
    assert (env.source, env.rank, env.world_size, env.master_addr) == ("single", 0, 1, "127.0.0.1")
    with pytest.raises(ValueError, match="RANK"):
        read_dist_env({"RANK": "x", "WORLD_SIZE": "2"})
