-- Billing periods step whole months from a fixed anchor (the first period's start), so a
-- period starting on the 31st keeps its day: Jan 31, Feb 28, Mar 31, ... Stepping from the
-- previous (clamped) start would drift to the 28th for good.
ALTER TABLE organizations ADD COLUMN billing_anchor timestamptz;
UPDATE organizations SET billing_anchor = period_start;
ALTER TABLE organizations ALTER COLUMN billing_anchor SET NOT NULL;
