-- The trace context a parking came with (W3C traceparent of whoever parked it, when traces are
-- on): a resubmission's span links to the attempt it follows.
ALTER TABLE parkings ADD COLUMN trace_parent TEXT;
