# Two entry points (see README): `make demo` (install + main job) and `make test` (install + tests);
# `make test-fast` skips the end-to-end runs marked slow (subprocess training runs, accelerate launches, ...).
# Both run `ruff check .` (pyflakes + import order, configured in pyproject.toml) before pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# held-out 4K target set -> the doctor on it -> generic + domain-matched synthetic sets (defects in the target's defect-free train
# frames) -> pretrain -> compare report (each stage skips work already done)
demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/synthvit generate --config configs/generate/target-4k.yaml
	@# the data against the runs planned on it (compare's first model and settings): exit 1 (and the demo stops)
	@# only where finetune would refuse the data; its warnings are printed as findings
	HF_HUB_OFFLINE=1 $(VENV)/bin/synthvit doctor data=shards/target-4k model=vit_tiny_patch16_224 crop_size=128 \
		defect_crop_prob=0.8 test_fraction=0.25 report_dir=runs/demo-compare/doctor
	HF_HUB_OFFLINE=1 $(VENV)/bin/synthvit generate --config configs/generate/demo.yaml
	HF_HUB_OFFLINE=1 $(VENV)/bin/synthvit generate --config configs/generate/demo-domain.yaml
	HF_HUB_OFFLINE=1 $(VENV)/bin/synthvit pretrain --config configs/pretrain/demo.yaml
	HF_HUB_OFFLINE=1 $(VENV)/bin/synthvit compare --config configs/compare/demo.yaml
	@echo "report: runs/demo-compare/report.html (and report.md)"

test: install
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_pretrain.py

clean:
	rm -rf $(VENV) shards/demo shards/demo-domain shards/target-4k runs/demo-pretrain runs/demo-compare
