"""Launching training at cluster scale: the layout planner, SLURM scripts and per-node torchrun commands.

    python -m launch plan --model llama2_7b --gpus 8 --seq-len 4096 --global-batch-tokens 4194304
    python -m launch slurm --config CONFIG --nodes 4 --gpus-per-node 8 [--submit]
    python -m launch plan --device cpu --model bench_25m --gpus 1 --seq-len 256 --global-batch-tokens 2048
    python -m launch torchrun --config CONFIG --nodes 2 --node-rank 0 --master HOST:29500 [--run]

Modules: ``planner`` (memory / FLOPs / step-time model and layout search; its MFU formula is
``model.config.model_flops_per_token``, which training imports too), ``cpu_plan`` (host memory of one CPU training process, with the runtime's
fixed overhead measured), ``slurm`` (sbatch scripts), ``torchrun`` (per-node commands), ``env``
(rank and world size from torchrun, SLURM or OpenMPI variables).
"""
