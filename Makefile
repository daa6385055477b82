.PHONY: style quality test test-slow benchmark

check_dirs := src tests benchmarks examples scripts

style:
	ruff check $(check_dirs) --fix
	ruff format $(check_dirs)

quality:
	ruff check $(check_dirs)
	ruff format --check $(check_dirs)

test:
	python -m pytest -q

test-slow:
	python -m pytest -q -m slow

benchmark:
	python benchmarks/rollout.py
