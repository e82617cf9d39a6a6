-- Hostile input (issue 9).
--
-- Dead letters keep the body exactly as received, byte for byte, next to the readable
-- `payload` (in which NUL, which jsonb cannot hold, is replaced by U+FFFD): replay reads the
-- bytes when it has them.
ALTER TABLE dead_letters ADD COLUMN raw_body bytea;

-- A call that ended connected but whose duration no source gave is not billed in silence: it
-- waits here for review (reconciliation asks VAPI for its record) and is billed once known.
ALTER TABLE calls ADD COLUMN review_reason text;
CREATE INDEX calls_review ON calls (created_at, id) WHERE review_reason IS NOT NULL;
