-- W5 bookkeeping: when the handler saw each position; when the appender called append and
-- when its commit returned (wall clock, seconds since the epoch).
CREATE TABLE seen (pos BIGINT PRIMARY KEY, seen_at FLOAT8 NOT NULL);
CREATE TABLE committed (pos BIGINT PRIMARY KEY, committed_at FLOAT8 NOT NULL,
                        called_at FLOAT8 NOT NULL);
