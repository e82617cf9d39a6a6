-- Calls whose end-of-call report never arrived (VAPI does not retry) are reconciled against
-- VAPI's own record of the call. A call VAPI reports ended is finished through the event
-- pipeline like any report, billed once; one VAPI does not know, or still reports open long
-- past the longest allowed call, is marked ended without billing. Both record when and why.
-- Nullable with no default: adding them rewrites no partition.
ALTER TABLE calls ADD COLUMN reconciled_at timestamptz;
ALTER TABLE calls ADD COLUMN reconcile_note text;
