# The README's two commands. Both set up .venv/ first (scripts/setup.sh is idempotent).
.PHONY: run test setup

setup:
	bash scripts/setup.sh

run: setup
	HF_HUB_OFFLINE=1 .venv/bin/sparrow train loop.run_dir=runs/tiny-cpu-$$(date +%Y%m%d-%H%M%S)

test:
	bash scripts/test.sh
