#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data volume.
# Creates the application's role and database as the native stack does
# (infra/local/postgres.sh): a login role with CREATEDB (tests make scratch
# databases) that owns its database and is not a superuser, so a migration that
# needs more privilege fails here as it does natively. The names come from the
# same FLEETPLANE_DATABASE_* values the services use (docker-compose.yml).
set -euo pipefail
psql -v ON_ERROR_STOP=1 -X -q --username "$POSTGRES_USER" --dbname postgres \
    -v user="$FLEETPLANE_DATABASE_USER" -v password="$FLEETPLANE_DATABASE_PASSWORD" \
    -v db="$FLEETPLANE_DATABASE_NAME" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN CREATEDB PASSWORD %L', :'user', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user') \gexec
SQL
