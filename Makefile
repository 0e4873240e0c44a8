# The README's two commands. Both set up .venv/ first (scripts/setup.sh is idempotent).
.PHONY: run test setup

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/sparrow overview --out runs/overview

test:
	bash scripts/test.sh
