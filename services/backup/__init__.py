"""Logical PostgreSQL backups to S3-compatible storage: backup, list, restore, verify, prune.

Each verb is one thin module; the work is in ``postgres`` (pg_dump, pg_restore, the
snapshot's checksums, the restore's invariant repairs), ``storage`` (the bucket) and
``crypto`` (age encryption). ``python -m services.backup --help`` lists the verbs.
"""
