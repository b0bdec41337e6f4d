# The two commands of the README's quick start, on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-rabbitmq lint format bench clean

# The server and, beside it, the client package (clients/python), whose `runyard` command runs
# the client commands and the server's admin commands. The client goes second: a venv made
# before it had the server's own `runyard` script, which upgrading the server deletes.
$(STAMP): setup.cfg pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	$(BIN)/python -m pip install --quiet -e './clients/python[cli]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/runyard up

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/pytest

# The second broker: the core and fault tests again with RabbitMQ as the broker (README,
# "Choosing a broker"). tests/conftest.py gives the run a vhost of its own (rabbitmqctl, as root);
# Redis stays the result backend. Tests that read kombu's Redis keys are skipped with their
# reason; their RabbitMQ counterparts run here. The broker fault tests stop the machine's
# RabbitMQ application: it is started again whatever the outcome.
RABBITMQ_URL ?= amqp://guest:guest@127.0.0.1:5672//
RABBITMQ_TESTS := \
	tests/workers/test_runs.py \
	tests/workers/test_runtimes.py::test_priority_nine_behind_a_backlog_starts_first \
	tests/workers/test_runtimes.py::test_a_cancelled_queued_execution_never_starts_even_with_its_message_queued \
	tests/workers/test_chains_runs.py \
	tests/workers/test_schedules_live.py \
	tests/workers/test_recovery.py \
	tests/workers/test_sweeper_rabbitmq.py \
	tests/workers/test_rabbitmq_publish.py \
	tests/workers/test_celeryconfig.py \
	tests/app/test_batch.py \
	tests/test_flower.py \
	tests/faults/test_worker_faults.py \
	tests/faults/test_outages.py \
	tests/faults/test_storage_faults.py \
	tests/hosts

test-rabbitmq: $(STAMP)
	RUNYARD_BROKER_URL=$(RABBITMQ_URL) $(BIN)/pytest $(RABBITMQ_TESTS); \
	status=$$?; rabbitmqctl start_app >/dev/null; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .runyard *.egg-info .pytest_cache .ruff_cache .import_linter_cache
