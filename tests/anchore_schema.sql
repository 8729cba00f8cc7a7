-- The Anchore catalog tables anchore-objmig reads and writes, as Anchore
-- creates them (see ../../shared/anchore-format.md). Used by the tests, the
-- demo and the benchmarks to stand in for a real Anchore database.

DO $$ BEGIN
    CREATE TYPE task_states AS ENUM ('initializing', 'pending', 'running', 'complete', 'failed');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS archive_metadata (
    bucket            varchar NOT NULL,
    "archiveId"       varchar NOT NULL,
    "userId"          varchar NOT NULL,
    "documentName"    varchar NOT NULL,
    content_url       varchar,
    is_compressed     boolean,
    digest            varchar,
    size              bigint,
    document_metadata varchar,
    created_at        integer,
    last_updated      integer,
    record_state_key  varchar,
    record_state_val  varchar,
    PRIMARY KEY (bucket, "archiveId", "userId", "documentName")
);

CREATE TABLE IF NOT EXISTS archive_document (
    bucket            varchar NOT NULL,
    "archiveId"       varchar NOT NULL,
    "userId"          varchar NOT NULL,
    "documentName"    varchar NOT NULL,
    created_at        integer,
    last_updated      integer,
    record_state_key  varchar,
    record_state_val  varchar,
    jsondata          varchar,
    b64_encoded       boolean,
    PRIMARY KEY (bucket, "archiveId", "userId", "documentName")
);

CREATE TABLE IF NOT EXISTS object_storage (
    "userId"          varchar NOT NULL,
    bucket            varchar NOT NULL,
    key               varchar NOT NULL,
    version           varchar NOT NULL,
    object_metadata   varchar,
    content           bytea,
    created_at        integer,
    last_updated      integer,
    PRIMARY KEY ("userId", bucket, key, version)
);

CREATE TABLE IF NOT EXISTS tasks (
    id            serial PRIMARY KEY,
    state         task_states,
    last_state    task_states,
    created_at    timestamp without time zone,
    started_at    timestamp without time zone,
    ended_at      timestamp without time zone,
    last_updated  timestamp without time zone,
    executor_id   varchar,
    type          varchar
);

CREATE TABLE IF NOT EXISTS archive_migration_tasks (
    id                            integer PRIMARY KEY REFERENCES tasks (id),
    migrate_from_driver           varchar,
    migrate_to_driver             varchar,
    archive_documents_to_migrate  integer,
    archive_documents_migrated    integer,
    online_migration              boolean
);
