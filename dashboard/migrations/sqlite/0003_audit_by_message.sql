-- A message's audit records, newest first: its last resubmission (was it edited?) for a rule draft.
CREATE INDEX audit_by_message ON audit (message_id, row_id);
