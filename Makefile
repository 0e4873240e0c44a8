# The README's two commands. Both set up .venv/ first (scripts/setup.sh is idempotent).
.PHONY: run test test-py312 setup

setup:
	bash scripts/setup.sh

run: setup
	HF_HUB_OFFLINE=1 .venv/bin/sparrow train loop.run_dir=runs/tiny-cpu-$$(date +%Y%m%d-%H%M%S)

test:
	bash scripts/test.sh

# Only the trainer tests on Python 3.12 with the GPU image's megatron-core (.venv312/; part of `test`).
test-py312:
	bash scripts/test_py312.sh
