-- Owner of each experiment: the name of the API key that submitted it (serve_app/auth.py).
-- NULL for experiments created keyless or before keys existed: only an admin sees those.
ALTER TABLE experiments ADD COLUMN owner TEXT;
