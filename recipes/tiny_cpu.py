"""The embedded default (what `sparrow train` runs with no recipe): tiny Qwen3, recall task, CPU."""

from sparrow_megatron.loop.default import tiny_cpu


def recipe():
    return tiny_cpu()
