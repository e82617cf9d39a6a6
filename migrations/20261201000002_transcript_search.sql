-- Transcript search: a GIN index on the search vector, partitioned like the table. Created here
-- on the parent only (instant, and invalid until every partition has its own): each existing
-- partition's index is built with CREATE INDEX CONCURRENTLY and attached by `callplane migrate`
-- or `callplane search index`, so writes go on while it builds. Partitions made from now on get
-- theirs when they are created.
CREATE INDEX call_transcripts_search ON ONLY call_transcripts USING gin (search);
