-- The highest epoch fenced in each im.messages partition (README.md,
-- "Fencing"): written by persist in the same transaction as the rows after the fence, read
-- by persist and by logic's recovery when they start on a partition, so a fence before the
-- committed offset still stales what a fenced-off owner wrote after it.
CREATE TABLE IF NOT EXISTS log_fences (
  log_partition INTEGER NOT NULL PRIMARY KEY,
  epoch INTEGER NOT NULL
);
