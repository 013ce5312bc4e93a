-- A person's action on a message from the moment it is taken until its outcome is recorded: at
-- most one per message (resubmit and discard of one message cannot both happen). `plan` is JSON:
-- what is published (subject, de-duplicating id, headers, body) and what is recorded once it is.
-- Kept in step with ../sqlite/0002_actions.sql.
CREATE TABLE actions (
    message_id TEXT   PRIMARY KEY,
    started_at BIGINT NOT NULL,
    plan       TEXT   NOT NULL
);
