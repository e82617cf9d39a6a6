//! Transcripts in object storage: phase 3's `backends.transcripts = "object-store"` (the
//! `object-store` feature), on any S3-compatible store (`s3://bucket/prefix`) or a directory of
//! this machine (`file:///...`, the embedded default).
//!
//! Each version of a call's transcript is one gzip-compressed JSON object (the text, the
//! messages, whose call it is), named by (128 bits of) the SHA-256 of its content under the organization and
//! the call's month: `<prefix>/transcripts/<org>/<YYYY-MM>/<call id>/<digest>.json.gz`. A put is
//! atomic, and a retry writes the same name with the same bytes, so no reader ever sees half an
//! object. The row in `call_transcripts` keeps what the database needs: the text (search and
//! its snippets read it), `is_final`, the object's key and its message count; its `messages`
//! stay `[]`. The row decides which version wins, by the same rule as the Postgres backend
//! ([`crate::transcripts::REPLACES`]); the version it gives way to is then deleted.
//!
//! The object is written first and the row after, and either failing fails the event, which
//! stays in the inbox (or the pipeline's retries) and is tried again: a transcript is never
//! lost to an object-store outage. The store's own retries are kept short so an outage fails
//! fast instead of holding a worker.
//!
//! Reads go through: `get` reads the row and, when it names an object, the object. Rows whose
//! messages are still in the database (written before the switch, or moved back) read as they
//! are, so the backend can be switched while transcripts are moved
//! (`callplane transcripts move`).

use crate::transcripts::{REPLACES, StoredTranscript, read};
use crate::{PgStore, db};
use async_trait::async_trait;
use bytes::Bytes;
use callplane_core::OrgId;
use callplane_core::seams::{StoreError, StoreResult, Transcript, TranscriptStore};
use chrono::{DateTime, Utc};
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use futures::StreamExt;
use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;
use tracing::{instrument, warn};
use url::Url;
use uuid::Uuid;

const BACKEND: &str = "object-store";

/// Where objects are kept, and how to reach an S3-compatible server.
#[derive(Clone, Debug, Default)]
pub struct ObjectStoreConfig {
    /// `s3://bucket/prefix`, `file:///absolute/dir`, or a plain directory path (relative to the
    /// working directory).
    pub url: String,
    /// An S3-compatible server's address (`http://127.0.0.1:9000`); AWS's when unset.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// How long one request may take before it counts as failed.
    pub timeout: Duration,
}

/// A handle on the object store: where it is, and the prefix every key lives under.
#[derive(Clone)]
pub struct Objects {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) prefix: ObjectPath,
    /// The URL, for messages (it carries no credentials).
    describe: String,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Objects {
    /// Opens the store the configuration names. A local directory is created if missing; an
    /// S3 bucket must exist already (its reachability is found out on first use).
    pub fn open(config: &ObjectStoreConfig) -> StoreResult<Self> {
        let refuse = |message: String| StoreError::Internal(format!("object_store.url: {message}"));
        let url = match Url::parse(&config.url) {
            Ok(url) => url,
            Err(url::ParseError::RelativeUrlWithoutBase) => {
                let dir = std::path::absolute(&config.url).map_err(|e| refuse(format!("{:?}: {e}", config.url)))?;
                Url::from_directory_path(&dir)
                    .map_err(|()| refuse(format!("{} is not a directory path", dir.display())))?
            }
            Err(e) => return Err(refuse(format!("{:?}: {e}", config.url))),
        };
        let describe = url.to_string();
        let (store, prefix): (Arc<dyn ObjectStore>, ObjectPath) = match url.scheme() {
            "file" => {
                let dir = url.to_file_path().map_err(|()| refuse(format!("{url} is not a local path")))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| refuse(format!("could not create {}: {e}", dir.display())))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| refuse(format!("{}: {e}", dir.display())))?;
                (Arc::new(local), ObjectPath::default())
            }
            "s3" => {
                let bucket =
                    url.host_str().filter(|b| !b.is_empty()).ok_or_else(|| refuse(format!("{url} names no bucket")))?;
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(config.region.clone().unwrap_or_else(|| "us-east-1".into()))
                    // Fail fast: the event that needed the object is retried by the pipeline.
                    .with_retry(RetryConfig {
                        max_retries: 2,
                        retry_timeout: config.timeout.saturating_mul(3),
                        ..RetryConfig::default()
                    })
                    .with_client_options(
                        ClientOptions::new().with_timeout(config.timeout).with_connect_timeout(config.timeout),
                    );
                if let Some(endpoint) = &config.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
                    builder = builder.with_access_key_id(id).with_secret_access_key(secret);
                }
                let s3 = builder.build().map_err(|e| refuse(format!("{url}: {e}")))?;
                let prefix = ObjectPath::parse(url.path()).map_err(|e| refuse(format!("{url}: {e}")))?;
                (Arc::new(s3), prefix)
            }
            other => return Err(refuse(format!("{other}:// is not a store this build has; use s3:// or file://"))),
        };
        Ok(Self { store, prefix, describe })
    }

    /// The store's URL, without credentials.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The key of a transcript version, under the organization and the call's month.
    fn transcript_key(&self, org: OrgId, call_id: &str, created_at: DateTime<Utc>, digest: &str) -> ObjectPath {
        let parts = [
            PathPart::from("transcripts"),
            PathPart::from(org.0.to_string()),
            PathPart::from(created_at.format("%Y-%m").to_string()),
            PathPart::from(call_segment(call_id)),
            PathPart::from(format!("{}.json.gz", &digest[..32])),
        ];
        self.prefix.parts().chain(parts).collect()
    }

    pub(crate) async fn put(&self, key: &ObjectPath, body: Bytes) -> StoreResult<()> {
        self.store.put(key, PutPayload::from_bytes(body)).await.map(|_| ()).map_err(object_error)
    }

    /// The object's bytes; `None` when there is no such object.
    pub(crate) async fn get(&self, key: &ObjectPath) -> StoreResult<Option<Bytes>> {
        match self.store.get(key).await {
            Ok(found) => found.bytes().await.map(Some).map_err(object_error),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(object_error(e)),
        }
    }

    /// Deletes an object; one already gone is fine.
    async fn delete(&self, key: &ObjectPath) -> StoreResult<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(object_error(e)),
        }
    }

    /// Deletes a version no row points at any more. Best effort: a failure leaves an object
    /// that nothing reads, and says so.
    async fn discard(&self, key: &ObjectPath) {
        if let Err(e) = self.delete(key).await {
            warn!(error = %callplane_core::error_chain(&e), key = %key, "could not delete a replaced transcript object");
        }
    }
}

/// The call id as one key segment: as it is when it is a plain id of up to 40 characters
/// (VAPI's are UUIDs), else `hash-` and 128 bits of its SHA-256, so that no id from outside can
/// make a key some store refuses or reads as a path (`/`, `..`, `%`, control characters, a
/// thousand bytes). Keys stay short (under 150 bytes and the prefix): some S3-compatible
/// servers that keep objects as files name a file after the whole key.
fn call_segment(call_id: &str) -> String {
    let plain = (1..=40).contains(&call_id.len())
        && !call_id.starts_with("hash-")
        && call_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain { call_id.to_owned() } else { format!("hash-{}", &hex::encode(Sha256::digest(call_id.as_bytes()))[..32]) }
}

/// A key as stored in `call_transcripts.object_key` (already escaped), as a path.
pub(crate) fn stored_key(key: &str) -> StoreResult<ObjectPath> {
    ObjectPath::parse(key).map_err(|e| StoreError::Internal(format!("object key {key:?}: {e}")))
}

/// An object-store error as the seams see it: unreachable or timed out means try again later.
pub(crate) fn object_error(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::Generic { .. } => StoreError::unavailable(BACKEND, e),
        other => StoreError::backend(BACKEND, other),
    }
}

/// The content of a transcript object, version 1.
#[derive(Serialize)]
struct ObjectOut<'a> {
    format: u32,
    organization_id: Uuid,
    call_id: &'a str,
    call_created_at: DateTime<Utc>,
    is_final: bool,
    transcript: Option<&'a str>,
    messages: &'a [Value],
}

#[derive(Deserialize)]
struct ObjectIn {
    format: u32,
    organization_id: Uuid,
    call_id: String,
    is_final: bool,
    transcript: Option<String>,
    messages: Vec<Value>,
}

/// A transcript made into an object: its compressed bytes and the SHA-256 of its content
/// (hex), which names it.
pub(crate) struct Encoded {
    pub body: Bytes,
    pub digest: String,
}

pub(crate) fn encode(org: OrgId, call_id: &str, created_at: DateTime<Utc>, t: &Transcript) -> StoreResult<Encoded> {
    let content = ObjectOut {
        format: 1,
        organization_id: org.0,
        call_id,
        call_created_at: created_at,
        is_final: t.is_final,
        transcript: t.text.as_deref(),
        messages: &t.messages,
    };
    let json = serde_json::to_vec(&content).map_err(|e| StoreError::Internal(format!("transcript object: {e}")))?;
    let digest = hex::encode(Sha256::digest(&json));
    let mut gz = GzEncoder::new(Vec::with_capacity(json.len() / 3), Compression::default());
    gz.write_all(&json)
        .and_then(|()| gz.finish())
        .map(|body| Encoded { body: Bytes::from(body), digest })
        .map_err(|e| StoreError::Internal(format!("compressing a transcript object: {e}")))
}

/// Reads a transcript object back, checking that it is the call's it is stored for.
pub(crate) fn decode(body: &[u8], org: OrgId, call_id: &str, key: &str) -> StoreResult<Transcript> {
    let corrupt = |why: String| StoreError::Internal(format!("transcript object {key}: {why}"));
    let mut json = Vec::with_capacity(body.len() * 3);
    GzDecoder::new(body).read_to_end(&mut json).map_err(|e| corrupt(format!("not gzip: {e}")))?;
    let content: ObjectIn = serde_json::from_slice(&json).map_err(|e| corrupt(format!("not a transcript: {e}")))?;
    if content.format != 1 {
        return Err(corrupt(format!("format {} is not one this build reads", content.format)));
    }
    if content.organization_id != org.0 || content.call_id != call_id {
        return Err(corrupt(format!("holds call {} of organization {}", content.call_id, content.organization_id)));
    }
    Ok(Transcript { text: content.transcript, messages: content.messages, is_final: content.is_final })
}

/// The transcript store over object storage: writes each version to an object (with
/// `writes_objects`; otherwise it writes the row in the event's transaction, as the Postgres
/// backend does), and reads either kind of row.
#[derive(Clone)]
pub struct ObjectTranscriptStore {
    pg: PgStore,
    objects: Objects,
    writes_objects: bool,
}

impl ObjectTranscriptStore {
    /// `backends.transcripts = "object-store"`: new transcripts go to objects.
    pub fn new(pg: PgStore, objects: Objects) -> Self {
        Self { pg, objects, writes_objects: true }
    }

    /// `backends.transcripts = "postgres"` in a build that has an object store: new
    /// transcripts go to the row, and those already in objects are still read.
    pub fn reading(pg: PgStore, objects: Objects) -> Self {
        Self { pg, objects, writes_objects: false }
    }

    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Writes a version to its object, then points the row at it if the row takes it.
    async fn put_object(
        &self,
        org: OrgId,
        call_id: &str,
        created_at: DateTime<Utc>,
        t: &Transcript,
    ) -> StoreResult<()> {
        let encoded = encode(org, call_id, created_at, t)?;
        let key = self.objects.transcript_key(org, call_id, created_at, &encoded.digest);
        self.objects.put(&key, encoded.body).await?;
        let message_count = i32::try_from(t.messages.len())
            .map_err(|_| StoreError::Internal(format!("{} messages in one transcript", t.messages.len())))?;
        // Whether the row took this version, and the version it held before (as of the
        // statement's start: a version written in between by a concurrent delivery of the same
        // call is replaced without being deleted, and is left in the store, unread).
        let (before, written): (Option<String>, bool) = sqlx::query_as(&format!(
            "WITH before AS ( \
                 SELECT object_key FROM call_transcripts \
                 WHERE call_id = $1 AND created_at = $3 AND organization_id = $2), \
             written AS ( \
                 INSERT INTO call_transcripts \
                     (call_id, organization_id, created_at, transcript, messages, message_count, object_key, is_final) \
                 VALUES ($1, $2, $3, $4, '[]', $5, $6, $7) \
                 ON CONFLICT (call_id, created_at) DO UPDATE SET transcript = EXCLUDED.transcript, \
                     messages = '[]', message_count = EXCLUDED.message_count, object_key = EXCLUDED.object_key, \
                     is_final = EXCLUDED.is_final, updated_at = now() \
                 WHERE {REPLACES} AND call_transcripts.object_key IS DISTINCT FROM EXCLUDED.object_key \
                 RETURNING 1) \
             SELECT (SELECT object_key FROM before), EXISTS (SELECT 1 FROM written)"
        ))
        .bind(call_id)
        .bind(org.0)
        .bind(created_at)
        .bind(&t.text)
        .bind(message_count)
        .bind(key.as_ref())
        .bind(t.is_final)
        .fetch_one(self.pg.pool())
        .await
        .map_err(db)?;
        let ours = key.as_ref();
        if written {
            // The version this one replaced.
            if let Some(old) = before.filter(|old| old != ours) {
                self.objects.discard(&stored_key(&old)?).await;
            }
            return Ok(());
        }
        // Refused (a live transcript after the final one, one with fewer messages, the same
        // transcript again): this version is nobody's, unless the row holds exactly it. Asked
        // again, after the statement: a concurrent delivery of the same transcript may have put
        // it there since the statement's snapshot, and its object is this one.
        let now: Option<Option<String>> = sqlx::query_scalar(
            "SELECT object_key FROM call_transcripts WHERE call_id = $1 AND created_at = $2 AND organization_id = $3",
        )
        .bind(call_id)
        .bind(created_at)
        .bind(org.0)
        .fetch_optional(self.pg.pool())
        .await
        .map_err(db)?;
        if now.flatten().as_deref() != Some(ours) {
            self.objects.discard(&key).await;
        }
        Ok(())
    }
}

#[async_trait]
impl TranscriptStore for ObjectTranscriptStore {
    fn backend(&self) -> &'static str {
        if self.writes_objects { BACKEND } else { "postgres" }
    }

    fn stores_in_transaction(&self) -> bool {
        !self.writes_objects
    }

    #[instrument(skip_all, fields(org_id = %org, call_id))]
    async fn put(&self, org: OrgId, call_id: &str, call_created_at: DateTime<Utc>, t: &Transcript) -> StoreResult<()> {
        self.pg.ensure_partition_for(call_created_at).await?;
        if self.writes_objects {
            self.put_object(org, call_id, call_created_at, t).await
        } else {
            crate::transcripts::write(self.pg.pool(), org, call_id, call_created_at, t).await.map(|_| ())
        }
    }

    #[instrument(skip_all, fields(org_id = %org, call_id))]
    async fn get(&self, org: OrgId, call_id: &str) -> StoreResult<Option<Transcript>> {
        match read(&self.pg, org, call_id).await? {
            None => Ok(None),
            Some(StoredTranscript { transcript, object_key: None }) => Ok(Some(transcript)),
            Some(StoredTranscript { object_key: Some(key), .. }) => {
                let body = self.objects.get(&stored_key(&key)?).await?.ok_or_else(|| {
                    StoreError::Internal(format!(
                        "the transcript of call {call_id} is missing from {} ({key})",
                        self.objects.describe()
                    ))
                })?;
                decode(&body, org, call_id, &key).map(Some)
            }
        }
    }
}

/// Transcripts a move handles at once.
const MOVES_AT_ONCE: usize = 8;

/// Where `callplane transcripts move` takes transcripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveTarget {
    /// Out of the rows into objects.
    ObjectStore,
    /// Back from objects into the rows.
    Postgres,
}

/// Which transcripts to move.
#[derive(Clone, Debug)]
pub struct MoveRequest {
    pub to: MoveTarget,
    /// Only this organization's.
    pub org: Option<OrgId>,
    /// Only those of calls created before this instant.
    pub before: Option<DateTime<Utc>>,
    /// Rows read per statement.
    pub batch: i64,
}

/// How far a move has come.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MoveProgress {
    /// Transcripts still to move when the move started.
    pub total: i64,
    pub moved: i64,
    /// Changed by live traffic between being read and being switched over: left as they were
    /// (a later run moves them).
    pub skipped: i64,
    /// Bytes of messages (as stored in the rows) moved out of the database, or back in.
    pub message_bytes: i64,
}

/// What a move did.
#[derive(Clone, Debug, Serialize)]
pub struct MoveReport {
    pub to: MoveTarget,
    #[serde(flatten)]
    pub progress: MoveProgress,
    /// Transcripts on the side moved from that the filters cover, after the move (0 unless
    /// some were skipped or arrived meanwhile).
    pub left: i64,
    pub store: String,
    pub seconds: f64,
}

impl ObjectTranscriptStore {
    /// Moves transcripts between the rows and the object store, a batch of rows at a time,
    /// with traffic running. Out of the rows: each transcript is written to its object, read
    /// back and compared (size and SHA-256), and only then is the row switched to it, if the
    /// row is still as it was read. Back into the rows: each object is read, checked to be the
    /// call's, written into its row if the row still points at it, and then deleted. Safe to
    /// stop and run again: it picks up the transcripts still on the side it moves from.
    pub async fn move_transcripts(
        &self,
        r: &MoveRequest,
        mut progress: impl FnMut(&MoveProgress),
    ) -> StoreResult<MoveReport> {
        let started = std::time::Instant::now();
        let from_objects = r.to == MoveTarget::Postgres;
        let total = self.count_to_move(r, from_objects).await?;
        let mut p = MoveProgress { total, ..MoveProgress::default() };
        progress(&p);
        // Keyset over (created_at, call_id): rows skipped in this run are not read again.
        let mut after: Option<(DateTime<Utc>, String)> = None;
        loop {
            let rows: Vec<MoveRow> = sqlx::query_as(&format!(
                "SELECT call_id, organization_id, created_at, transcript, messages, is_final, object_key, \
                        pg_column_size(messages)::bigint AS message_bytes \
                 FROM call_transcripts \
                 WHERE object_key IS {} NULL AND ($1::uuid IS NULL OR organization_id = $1) \
                   AND ($2::timestamptz IS NULL OR created_at < $2) \
                   AND ($3::timestamptz IS NULL OR (created_at, call_id) > ($3, $4)) \
                 ORDER BY created_at, call_id LIMIT $5",
                if from_objects { "NOT" } else { "" }
            ))
            .bind(r.org.map(|o| o.0))
            .bind(r.before)
            .bind(after.as_ref().map(|a| a.0))
            .bind(after.as_ref().map(|a| a.1.clone()))
            .bind(r.batch.max(1))
            .fetch_all(self.pg.pool())
            .await
            .map_err(db)?;
            let Some(last) = rows.last() else { break };
            after = Some((last.created_at, last.call_id.clone()));
            // A few at once: each is a round trip or two to the store and one to the database.
            let mut moves =
                futures::stream::iter(rows)
                    .map(|row| async move {
                        if from_objects { self.move_in(&row).await } else { self.move_out(&row).await }
                    })
                    .buffer_unordered(MOVES_AT_ONCE);
            while let Some(moved) = moves.next().await {
                match moved? {
                    Some(bytes) => {
                        p.moved += 1;
                        p.message_bytes += bytes;
                    }
                    None => p.skipped += 1,
                }
            }
            progress(&p);
        }
        let left = self.count_to_move(r, from_objects).await?;
        Ok(MoveReport {
            to: r.to,
            progress: p,
            left,
            store: self.objects.describe().to_owned(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    async fn count_to_move(&self, r: &MoveRequest, from_objects: bool) -> StoreResult<i64> {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM call_transcripts WHERE object_key IS {} NULL \
             AND ($1::uuid IS NULL OR organization_id = $1) AND ($2::timestamptz IS NULL OR created_at < $2)",
            if from_objects { "NOT" } else { "" }
        ))
        .bind(r.org.map(|o| o.0))
        .bind(r.before)
        .fetch_one(self.pg.pool())
        .await
        .map_err(db)
    }

    /// One row's transcript out to its object. `None`: the row changed since it was read.
    async fn move_out(&self, row: &MoveRow) -> StoreResult<Option<i64>> {
        let org = OrgId(row.organization_id);
        let messages = match &row.messages {
            Value::Array(a) => a.clone(),
            _ => Vec::new(),
        };
        let t = Transcript { text: row.transcript.clone(), messages, is_final: row.is_final };
        let encoded = encode(org, &row.call_id, row.created_at, &t)?;
        let key = self.objects.transcript_key(org, &row.call_id, row.created_at, &encoded.digest);
        let (size, sum) = (encoded.body.len(), Sha256::digest(&encoded.body));
        self.objects.put(&key, encoded.body).await?;
        let back = self.objects.get(&key).await?.ok_or_else(|| {
            StoreError::Internal(format!("{key} was written to {} but is not there", self.objects.describe()))
        })?;
        if back.len() != size || Sha256::digest(&back) != sum {
            return Err(StoreError::Internal(format!(
                "{key} read back {} bytes that differ from the {size} written; nothing was switched",
                back.len()
            )));
        }
        let count = i32::try_from(t.messages.len())
            .map_err(|_| StoreError::Internal(format!("{} messages in one transcript", t.messages.len())))?;
        let switched = sqlx::query(
            "UPDATE call_transcripts SET messages = '[]', message_count = $4, object_key = $5, updated_at = now() \
             WHERE call_id = $1 AND created_at = $2 AND organization_id = $3 AND object_key IS NULL \
               AND messages = $6 AND is_final = $7 AND transcript IS NOT DISTINCT FROM $8",
        )
        .bind(&row.call_id)
        .bind(row.created_at)
        .bind(row.organization_id)
        .bind(count)
        .bind(key.as_ref())
        .bind(&row.messages)
        .bind(row.is_final)
        .bind(&row.transcript)
        .execute(self.pg.pool())
        .await
        .map_err(db)?
        .rows_affected()
            == 1;
        if !switched {
            self.objects.discard(&key).await;
            return Ok(None);
        }
        Ok(Some(row.message_bytes))
    }

    /// One row's transcript back from its object. `None`: the row changed since it was read.
    async fn move_in(&self, row: &MoveRow) -> StoreResult<Option<i64>> {
        let Some(key) = &row.object_key else { return Ok(None) };
        let org = OrgId(row.organization_id);
        let path = stored_key(key)?;
        let body = self.objects.get(&path).await?.ok_or_else(|| {
            StoreError::Internal(format!(
                "the transcript of call {} is missing from {} ({key}); its row is left as it is",
                row.call_id,
                self.objects.describe()
            ))
        })?;
        let t = decode(&body, org, &row.call_id, key)?;
        let messages = serde_json::to_value(&t.messages).map_err(|e| StoreError::Internal(e.to_string()))?;
        let bytes: Option<i64> = sqlx::query_scalar(
            "UPDATE call_transcripts SET messages = $4, message_count = NULL, object_key = NULL, \
                 transcript = $5, is_final = $6, updated_at = now() \
             WHERE call_id = $1 AND created_at = $2 AND organization_id = $3 AND object_key = $7 \
             RETURNING pg_column_size(messages)::bigint",
        )
        .bind(&row.call_id)
        .bind(row.created_at)
        .bind(row.organization_id)
        .bind(&messages)
        .bind(&t.text)
        .bind(t.is_final)
        .bind(key)
        .fetch_optional(self.pg.pool())
        .await
        .map_err(db)?;
        let Some(bytes) = bytes else { return Ok(None) };
        self.objects.discard(&path).await;
        Ok(Some(bytes))
    }
}

/// A row a move reads.
#[derive(sqlx::FromRow)]
struct MoveRow {
    call_id: String,
    organization_id: Uuid,
    created_at: DateTime<Utc>,
    transcript: Option<String>,
    messages: Value,
    is_final: bool,
    object_key: Option<String>,
    message_bytes: i64,
}
