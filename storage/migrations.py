"""A small versioned-migration runner for the node's SQLite database.

Why not Alembic: the node owns one SQLite file, upgrades happen when the
daemon starts (under the write lock, so a CLI and a daemon starting together
cannot both migrate), and a migration is a handful of SQL statements. A list
of numbered steps and a ``schema_version`` table do that with no ``env.py``,
no ``alembic.ini`` and nothing to get wrong at install time.

Rules for adding a step: append, never edit an applied one; write plain SQL
(never ``metadata.create_all``, which follows today's models and would break
the steps after it); keep :mod:`storage.models` in step (a test compares the
migrated schema with the models).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

from triagenode.storage.snapshot import SCHEMA_VERSION
from triagenode.storage.timeutil import utcnow


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "studies, series, instances, study events, receiver heartbeat",
        (
            """CREATE TABLE studies (
                id INTEGER NOT NULL PRIMARY KEY,
                study_uid VARCHAR(64) NOT NULL UNIQUE,
                state VARCHAR(16) NOT NULL,
                modality VARCHAR(64),
                study_date VARCHAR(8),
                description VARCHAR(64),
                series_count INTEGER NOT NULL DEFAULT 0,
                instance_count INTEGER NOT NULL DEFAULT 0,
                byte_count INTEGER NOT NULL DEFAULT 0,
                received_at DATETIME NOT NULL,
                last_instance_at DATETIME NOT NULL,
                updated_at DATETIME NOT NULL,
                lease_owner VARCHAR(64),
                lease_expires_at DATETIME,
                processing_attempts INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX ix_studies_state_updated ON studies (state, updated_at)",
            "CREATE INDEX ix_studies_updated ON studies (updated_at)",
            "CREATE INDEX ix_studies_state_last_instance ON studies (state, last_instance_at)",
            """CREATE TABLE series (
                id INTEGER NOT NULL PRIMARY KEY,
                study_id INTEGER NOT NULL REFERENCES studies (id) ON DELETE CASCADE,
                series_uid VARCHAR(64) NOT NULL,
                modality VARCHAR(16),
                series_number INTEGER,
                description VARCHAR(64),
                instance_count INTEGER NOT NULL DEFAULT 0,
                UNIQUE (study_id, series_uid)
            )""",
            "CREATE INDEX ix_series_study_id ON series (study_id)",
            """CREATE TABLE instances (
                id INTEGER NOT NULL PRIMARY KEY,
                series_id INTEGER NOT NULL REFERENCES series (id) ON DELETE CASCADE,
                sop_instance_uid VARCHAR(64) NOT NULL UNIQUE,
                sop_class_uid VARCHAR(64) NOT NULL,
                transfer_syntax_uid VARCHAR(64) NOT NULL,
                path VARCHAR NOT NULL,
                size INTEGER NOT NULL,
                received_at DATETIME NOT NULL,
                calling_ae VARCHAR(16) NOT NULL
            )""",
            "CREATE INDEX ix_instances_series_id ON instances (series_id)",
            """CREATE TABLE study_events (
                id INTEGER NOT NULL PRIMARY KEY,
                study_id INTEGER NOT NULL REFERENCES studies (id) ON DELETE CASCADE,
                at DATETIME NOT NULL,
                from_state VARCHAR(16),
                to_state VARCHAR(16) NOT NULL,
                reason VARCHAR NOT NULL
            )""",
            "CREATE INDEX ix_study_events_study_id ON study_events (study_id)",
            """CREATE TABLE receiver_heartbeat (
                id INTEGER NOT NULL PRIMARY KEY,
                pid INTEGER NOT NULL,
                hostname VARCHAR(255) NOT NULL,
                ae_title VARCHAR(16) NOT NULL,
                port INTEGER NOT NULL,
                started_at DATETIME NOT NULL,
                heartbeat_at DATETIME NOT NULL,
                stopped_at DATETIME
            )""",
        ),
    ),
    Migration(
        2,
        "study results and report deliveries",
        (
            """CREATE TABLE study_results (
                id INTEGER NOT NULL PRIMARY KEY,
                study_id INTEGER NOT NULL UNIQUE REFERENCES studies (id) ON DELETE CASCADE,
                applicable BOOLEAN NOT NULL,
                reason VARCHAR,
                finding BOOLEAN,
                probability FLOAT,
                threshold FLOAT,
                model VARCHAR(64) NOT NULL,
                model_version VARCHAR(64) NOT NULL,
                series_uid VARCHAR(64),
                key_instance_uid VARCHAR(64),
                slices INTEGER,
                timings_ms VARCHAR NOT NULL,
                sr_path VARCHAR,
                sr_sop_instance_uid VARCHAR(64),
                created_at DATETIME NOT NULL
            )""",
            """CREATE TABLE deliveries (
                id INTEGER NOT NULL PRIMARY KEY,
                study_id INTEGER NOT NULL REFERENCES studies (id) ON DELETE CASCADE,
                destination VARCHAR(64) NOT NULL,
                state VARCHAR(16) NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at DATETIME NOT NULL,
                last_error VARCHAR,
                sent_at DATETIME,
                UNIQUE (study_id, destination)
            )""",
            "CREATE INDEX ix_deliveries_study_id ON deliveries (study_id)",
            "CREATE INDEX ix_deliveries_state_next ON deliveries (state, next_attempt_at)",
        ),
    ),
    Migration(
        3,
        "a task per study and model: leases, attempts, results and deliveries move to tasks; routing; pauses",
        (
            # Every study that got past receiving (or has a result) becomes one task of the one model it ran
            # before: "default", the name of the route [inference] model makes when there is no [[models]].
            """CREATE TABLE tasks (
                id INTEGER NOT NULL PRIMARY KEY,
                study_id INTEGER NOT NULL REFERENCES studies (id) ON DELETE CASCADE,
                model VARCHAR(64) NOT NULL,
                state VARCHAR(16) NOT NULL,
                lease_owner VARCHAR(64),
                lease_expires_at DATETIME,
                processing_attempts INTEGER NOT NULL DEFAULT 0,
                queued_at DATETIME NOT NULL,
                updated_at DATETIME NOT NULL,
                UNIQUE (study_id, model)
            )""",
            "CREATE INDEX ix_tasks_state_queued ON tasks (state, queued_at)",
            """INSERT INTO tasks (study_id, model, state, lease_owner, lease_expires_at, processing_attempts,
                                  queued_at, updated_at)
               SELECT id, 'default', CASE state WHEN 'receiving' THEN 'queued' ELSE state END, lease_owner,
                      lease_expires_at, processing_attempts, updated_at, updated_at
               FROM studies
               WHERE state != 'receiving' OR id IN (SELECT study_id FROM study_results)""",
            "ALTER TABLE studies ADD COLUMN urgent BOOLEAN NOT NULL DEFAULT 0",
            "ALTER TABLE studies ADD COLUMN routing VARCHAR",
            "ALTER TABLE studies DROP COLUMN lease_owner",
            "ALTER TABLE studies DROP COLUMN lease_expires_at",
            "ALTER TABLE studies DROP COLUMN processing_attempts",
            "ALTER TABLE series ADD COLUMN body_part VARCHAR(16)",
            "ALTER TABLE study_events ADD COLUMN model VARCHAR(64)",
            """CREATE TABLE task_results (
                id INTEGER NOT NULL PRIMARY KEY,
                task_id INTEGER NOT NULL UNIQUE REFERENCES tasks (id) ON DELETE CASCADE,
                applicable BOOLEAN NOT NULL,
                reason VARCHAR,
                finding BOOLEAN,
                probability FLOAT,
                threshold FLOAT,
                model VARCHAR(64) NOT NULL,
                model_version VARCHAR(64) NOT NULL,
                series_uid VARCHAR(64),
                key_instance_uid VARCHAR(64),
                slices INTEGER,
                timings_ms VARCHAR NOT NULL,
                sr_path VARCHAR,
                sr_sop_instance_uid VARCHAR(64),
                created_at DATETIME NOT NULL
            )""",
            """INSERT INTO task_results (task_id, applicable, reason, finding, probability, threshold, model,
                                         model_version, series_uid, key_instance_uid, slices, timings_ms, sr_path,
                                         sr_sop_instance_uid, created_at)
               SELECT t.id, r.applicable, r.reason, r.finding, r.probability, r.threshold, r.model, r.model_version,
                      r.series_uid, r.key_instance_uid, r.slices, r.timings_ms, r.sr_path, r.sr_sop_instance_uid,
                      r.created_at
               FROM study_results r JOIN tasks t ON t.study_id = r.study_id""",
            "DROP TABLE study_results",
            """CREATE TABLE task_deliveries (
                id INTEGER NOT NULL PRIMARY KEY,
                task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
                destination VARCHAR(64) NOT NULL,
                state VARCHAR(16) NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at DATETIME NOT NULL,
                last_error VARCHAR,
                sent_at DATETIME,
                UNIQUE (task_id, destination)
            )""",
            """INSERT INTO task_deliveries (id, task_id, destination, state, attempts, next_attempt_at, last_error,
                                            sent_at)
               SELECT d.id, t.id, d.destination, d.state, d.attempts, d.next_attempt_at, d.last_error, d.sent_at
               FROM deliveries d JOIN tasks t ON t.study_id = d.study_id""",
            "DROP TABLE deliveries",
            "CREATE INDEX ix_task_deliveries_task_id ON task_deliveries (task_id)",
            "CREATE INDEX ix_task_deliveries_state_next ON task_deliveries (state, next_attempt_at)",
            """CREATE TABLE model_pauses (
                model VARCHAR(64) NOT NULL PRIMARY KEY,
                paused_at DATETIME NOT NULL,
                reason VARCHAR NOT NULL
            )""",
        ),
    ),
    Migration(
        4,
        "a result's lesion marks and skipped images, and its report objects besides the primary SR",
        (
            # NULL in every row written before: a classifier's result, with its one SR. The primary's
            # SOP class was not kept either; NULL says "unknown" (it was a Comprehensive (3D) SR).
            "ALTER TABLE task_results ADD COLUMN details VARCHAR",
            "ALTER TABLE task_results ADD COLUMN extra_objects VARCHAR",
            "ALTER TABLE task_results ADD COLUMN sr_sop_class_uid VARCHAR(64)",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version
if LATEST_VERSION != SCHEMA_VERSION:  # the CLI's plain-SQL reads (storage/snapshot.py) must know the new schema
    raise RuntimeError(f"migrations end at {LATEST_VERSION}, storage.snapshot.SCHEMA_VERSION says {SCHEMA_VERSION}")


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer node; running an older one would corrupt it."""


def current_version(connection: Connection) -> int:
    """The schema version of the database (0 for an empty file)."""
    exists = connection.execute(
        text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
    ).first()
    if not exists:
        return 0
    return connection.execute(text("SELECT COALESCE(MAX(version), 0) FROM schema_version")).scalar_one()


def upgrade(engine: Engine) -> list[Migration]:
    """Apply the missing migrations in one write transaction; returns what was applied."""
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER NOT NULL PRIMARY KEY, description VARCHAR NOT NULL, applied_at DATETIME NOT NULL)"
        )
        version = current_version(connection)
        if version > LATEST_VERSION:
            raise SchemaTooNewError(
                f"the database is at schema version {version}, this node knows up to {LATEST_VERSION}; "
                "install the newer node again or restore a backup"
            )
        applied = []
        for migration in MIGRATIONS:
            if migration.version <= version:
                continue
            for statement in migration.statements:
                connection.exec_driver_sql(statement)
            connection.execute(
                text("INSERT INTO schema_version (version, description, applied_at) VALUES (:v, :d, :t)"),
                {"v": migration.version, "d": migration.description, "t": utcnow()},
            )
            applied.append(migration)
        return applied
