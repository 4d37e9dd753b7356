# One image for every Python service of Fleetplane; docker-compose.yml picks the
# module to run (ENTRYPOINT is `python -m`), e.g. `services.api`.
# The Debian release is pinned: its postgresql-client-15 gives pg_dump and
# pg_restore of the server's major version (compose runs postgres:15); a newer
# client writes settings an older server refuses. tests/unit/compose checks this.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid: the edge container runs as the same uid to read the PKI keys
# (mode 0600) that the `pki` service writes into /pki. A named volume mounted on
# /pki starts as a copy of this folder, owner included.
RUN groupadd --system --gid 10001 fleetplane \
    && useradd --system --uid 10001 --gid fleetplane --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fleetplane \
    && mkdir /pki && chown fleetplane:fleetplane /pki

# The backup service's pg_dump and pg_restore (services.backup, BackupSettings.pg_bin).
RUN apt-get update \
    && apt-get install --yes --no-install-recommends postgresql-client-15 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies before the source, so this layer is rebuilt only when they change.
# requirements.lock pins the development virtualenv, linters and test tools
# included; used as constraints it pins every package while pip installs only
# what pyproject.toml's runtime dependencies pull in (tests/unit/compose checks
# that the lock covers all of them). Every wheel is prebuilt or pure Python, so
# no compiler is installed, nor left behind.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > runtime-requirements.txt \
    && pip install --constraint requirements.lock --requirement runtime-requirements.txt

COPY services ./services
# --no-deps: everything came from the lock above; pip check fails the build if
# something the project needs is missing. The build folder goes: services run
# the installed package, as a deployment does.
RUN pip install --no-deps . && pip check && cd / && rm -rf /build

# The image has no curl: compose's health checks run this instead.
COPY --chmod=0755 infra/compose/healthcheck.py /usr/local/bin/fleetplane-healthcheck

USER fleetplane
WORKDIR /tmp

ENTRYPOINT ["python", "-m"]
CMD ["services.api"]
