-- When the experiment's files (its shared bundle copy, the copied run outputs) were deleted by the
-- TTL sweep (serve_app/retention.py). NULL while they are kept; the rows go record_ttl_s later.
ALTER TABLE experiments ADD COLUMN files_expired_at REAL;
