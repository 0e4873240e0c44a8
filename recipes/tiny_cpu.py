"""The embedded default (what `sparrow train` runs with no recipe): tiny Qwen3, recall task, CPU.

On Slurm (`sparrow submit recipes/tiny_cpu.py --executor slurm cluster.account=...`) it is a
two-node CPU job: one node serves the SGLang engine, the other trains. Locally the cluster section
is ignored.
"""

from sparrow_megatron.loop.default import tiny_cpu


def recipe():
    cfg = tiny_cpu()
    cfg.cluster.nodes = 2
    cfg.cluster.rollout_nodes = 1
    cfg.cluster.env = {"HF_HUB_OFFLINE": "1"}
    return cfg
