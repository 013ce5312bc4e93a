-- The dashboard's store (SQLite). Times are epoch milliseconds; JSON is stored as text.
-- Kept in step with ../postgres/0001_store.sql: the same tables, columns and indexes.

-- One row per lineage (Mend-Id) that has been parked: its latest parking and status.
CREATE TABLE messages (
    row_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    service      TEXT    NOT NULL,
    binding      TEXT    NOT NULL,
    subject      TEXT    NOT NULL,
    msg_key      TEXT,
    status       TEXT    NOT NULL,
    attempt      BIGINT  NOT NULL,
    error_kind   TEXT    NOT NULL,
    error_code   TEXT,
    error_title  TEXT,
    error_status BIGINT,
    group_id     TEXT    NOT NULL,
    reason       TEXT,
    envelope     TEXT    NOT NULL,
    search       TEXT    NOT NULL,
    parked_at    BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL
);
CREATE INDEX messages_by_status  ON messages (status, row_id);
CREATE INDEX messages_by_service ON messages (service, row_id);
CREATE INDEX messages_by_group   ON messages (group_id, row_id);

-- Every parking taken in, once: redelivered parkings are recognised here.
CREATE TABLE parkings (
    id         TEXT   NOT NULL,
    attempt    BIGINT NOT NULL,
    parked_at  BIGINT NOT NULL,
    PRIMARY KEY (id, attempt)
);

-- Announcements from MEND_EVENTS (CloudEvents), once each: the timelines and the rule counts.
CREATE TABLE events (
    event_id   TEXT   PRIMARY KEY,
    message_id TEXT   NOT NULL,
    service    TEXT   NOT NULL,
    kind       TEXT   NOT NULL,
    attempt    BIGINT NOT NULL,
    at         BIGINT NOT NULL,
    rule       TEXT,
    source     TEXT   NOT NULL,
    data       TEXT   NOT NULL
);
CREATE INDEX events_by_message ON events (message_id, at);
CREATE INDEX events_by_kind    ON events (kind, at);

-- Every human action: who, when, what, and a payload before and after an edit.
CREATE TABLE audit (
    row_id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at             BIGINT NOT NULL,
    actor          TEXT   NOT NULL,
    action         TEXT   NOT NULL,
    message_id     TEXT,
    service        TEXT,
    msg_key        TEXT,
    note           TEXT,
    before_payload TEXT,
    after_payload  TEXT
);

-- Web sessions (shared by every dashboard on one database). The id is stored as its SHA-256.
CREATE TABLE sessions (
    id_hash    TEXT   PRIMARY KEY,
    username   TEXT   NOT NULL,
    role       TEXT   NOT NULL,
    csrf       TEXT   NOT NULL,
    expires_at BIGINT NOT NULL
);
