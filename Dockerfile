# Runyard: one image for every process (api, worker, beat, flower, `runyard db upgrade`).
#   docker build -t runyard .
#   docker run --rm -e DATABASE_URL=... -e REDIS_URL=... -p 8000:8000 runyard
# See docker-compose.yml for the whole stack.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# Dependencies first, from setup.cfg alone: this layer is rebuilt only when setup.cfg changes,
# not on every code edit. (configparser reads install_requires without building the project,
# so README.md, which setup.cfg uses for long_description, is not needed yet.)
COPY setup.cfg ./
RUN python -c "import configparser; c = configparser.RawConfigParser(); c.read('setup.cfg'); print(c['options']['install_requires'])" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The source tree, installed in place: app/ loads its JSON Schemas from ../schemas and
# app/migrate.py finds ../migrations, so the package must run from this tree, not a copied wheel.
# The tree stays owned by root and read-only for the runtime user; bytecode is compiled here
# because that user cannot write __pycache__.
COPY . .
# The client package brings the `runyard` command (client commands plus the admin ones).
RUN pip install --no-cache-dir -e './clients/python[cli]' -e . \
    && python -m compileall -q app workers runyard_examples migrations celeryconfig.py \
       clients/python/runyard_client

# Agents run inside the worker's child processes: never as root.
RUN useradd --create-home --uid 10001 --user-group runyard
USER runyard

EXPOSE 8000
CMD ["runyard", "api", "--host", "0.0.0.0", "--port", "8000"]
