"""The RL loop's parts: tail monitor, budget controller, tracking, plots, run directory, console."""
