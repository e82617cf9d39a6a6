-- Phase 3 keeps a transcript in object storage (`backends.transcripts = "object-store"`):
-- one compressed object per version of a call's transcript, named by its content, holds the
-- text and the messages. The row keeps what the database needs: the text (search and its
-- snippets read it), `is_final`, the object's key, and how many messages the object holds,
-- so that a live transcript still replaces a stored one only when it has at least as many
-- messages. `messages` stays '[]' on such a row. NULL `message_count`: the messages are in
-- the row, count them there.
ALTER TABLE call_transcripts ADD COLUMN message_count integer CHECK (message_count >= 0);
