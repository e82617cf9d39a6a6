//! Transcript search: `GET /v1/search` over the caller's transcripts, ranked, with snippets and
//! pages; off by configuration; and its index, built without blocking writes.

use crate::cli::{Cli, free_addr};
use crate::helpers::{TestApp, lifecycle};
use callplane_core::OrgId;
use chrono::{DateTime, Duration, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A call of `org` created at `created_at` whose end-of-call report carries `transcript`.
async fn call_saying(app: &TestApp, org: OrgId, id: &str, created_at: DateTime<Utc>, transcript: &str) {
    let mut events = lifecycle(id, created_at, 60.0);
    let report = events.last_mut().unwrap();
    report["message"]["transcript"] = json!(transcript);
    report["message"]["artifact"]["transcript"] = json!(transcript);
    for e in &events {
        let (status, body) = app.post_vapi(org, e).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

fn ids(page: &Value) -> Vec<String> {
    page["data"].as_array().unwrap().iter().map(|h| h["call_id"].as_str().unwrap().to_owned()).collect()
}

async fn search(app: &TestApp, key: &str, query: &str) -> (StatusCode, Value) {
    let url = reqwest::Url::parse_with_params(&format!("{}/v1/search", app.base), [("q", query)]).unwrap();
    let r = app.http.get(format!("{url}")).bearer_auth(key).send().await.unwrap();
    (r.status(), r.json().await.unwrap())
}

#[tokio::test]
async fn search_finds_the_callers_transcripts_ranked_with_snippets_in_pages() {
    let app = TestApp::spawn_with(&[("backends.search", "postgres")]).await;
    let (org, other) = (app.org("pro").await, app.org("pro").await);
    let now = Utc::now();
    let recent = now - Duration::hours(2);
    call_saying(&app, org.id, "refund-twice", recent, "User: I want a refund. AI: A refund is on its way.").await;
    call_saying(&app, org.id, "refund-once", recent, "User: Can I get a refund for the plumbing visit?").await;
    call_saying(&app, org.id, "refunded-angry", recent, "User: I was refunded 3 < 4 times & I am angry").await;
    call_saying(&app, org.id, "cancel", recent, "User: Please cancel my order for Thursday.").await;
    call_saying(&app, org.id, "old-refund", now - Duration::days(45), "User: refund please").await;
    call_saying(&app, other.id, "their-refund", recent, "User: refund refund refund").await;
    let key = app.api_key(org.id).await;

    // Every form of the word, best match first (ties: newest, then by id); another
    // organization's never; the window is the last 30 days by default.
    let (status, page) = search(&app, &key, "refunds").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), ["refund-twice", "refunded-angry", "refund-once"].map(String::from), "{page}");
    let ranks: Vec<f64> = page["data"].as_array().unwrap().iter().map(|h| h["rank"].as_f64().unwrap()).collect();
    assert!(ranks[0] > ranks[1] && ranks[1] >= ranks[2], "{ranks:?}");
    let snippet = page["data"][1]["snippet"].as_str().unwrap();
    assert_eq!(snippet, "User: I was <mark>refunded</mark> 3 &lt; 4 times &amp; I am angry");
    assert!(page["next_cursor"].is_null());

    // Web-search syntax: a phrase, an exclusion.
    assert_eq!(ids(&search(&app, &key, "\"cancel my order\"").await.1), ["cancel"]);
    assert_eq!(ids(&search(&app, &key, "refund -angry").await.1), ["refund-twice", "refund-once"]);
    assert!(ids(&search(&app, &key, "the").await.1).is_empty(), "only stop words: nothing");

    // An explicit window reaches the older call, and only it.
    let window = format!(
        "{}/v1/search?q=refund&from={}&to={}",
        app.base,
        (now - Duration::days(50)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        (now - Duration::days(40)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let page: Value = app.http.get(window).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(ids(&page), ["old-refund"], "{page}");

    // Pages of one: the same hits in the same order, none twice.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut params = vec![("q", "refund".to_owned()), ("limit", "1".to_owned())];
        if let Some(c) = &cursor {
            params.push(("cursor", c.clone()));
        }
        let url = reqwest::Url::parse_with_params(&format!("{}/v1/search", app.base), &params).unwrap();
        let page: Value = app.http.get(url).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(seen.len() <= 3, "{seen:?}");
    }
    assert_eq!(seen, ["refund-twice", "refunded-angry", "refund-once"]);

    // Bad input is refused with its code before it reaches the database.
    for (query, code) in [("", "invalid_query"), (&"x".repeat(201)[..], "invalid_query")] {
        let (status, body) = search(&app, &key, query).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some(code)), "{query:?}");
    }
    let (status, body) = app.get("/v1/search?q=refund&cursor=bm9wZQ", &key).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_cursor")));

    // The other organization finds its own.
    let theirs = app.api_key(other.id).await;
    assert_eq!(ids(&search(&app, &theirs, "refund").await.1), ["their-refund"]);
}

#[tokio::test]
async fn with_search_off_the_endpoint_answers_409_and_counts_the_attempt() {
    let app = TestApp::spawn_with(&[("backends.search", "off")]).await;
    let org = app.org("pro").await;
    let key = app.api_key(org.id).await;
    for _ in 0..2 {
        let (status, body) = search(&app, &key, "refund").await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("search_off")), "{body}");
        assert!(body["message"].as_str().unwrap().contains("backends.search"), "{body}");
    }
    let metrics = app.http.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "callplane_search_refused_total 2"), "{metrics}");
}

/// An install from before the index: the migration left the parent's index invalid and the
/// partitions without theirs. `callplane search index` builds each partition's concurrently and
/// attaches it; a second run has nothing to do; a partition made later gets its index at once.
#[tokio::test]
async fn the_search_index_is_built_on_existing_partitions_and_new_partitions_get_it() {
    let app = TestApp::spawn().await;
    let pool = app.db.store.pool();
    sqlx::raw_sql(
        "DROP INDEX call_transcripts_search; \
         CREATE INDEX call_transcripts_search ON ONLY call_transcripts USING gin (search);",
    )
    .execute(pool)
    .await
    .unwrap();
    assert!(!app.db.store.search_index_valid().await.unwrap());
    let partitions = app.count("SELECT count(*) FROM pg_inherits WHERE inhparent = 'call_transcripts'::regclass").await;
    assert!(partitions >= 4, "{partitions}");

    let cli = Cli { db_url: app.db.url.clone(), addr: free_addr() };
    let report = cli.json(&["search", "index", "--json"]);
    assert_eq!(report["partitions"], partitions, "{report}");
    assert_eq!(report["built"].as_array().unwrap().len() as i64, partitions, "{report}");
    assert_eq!(report["valid"], true, "{report}");
    let attached = "SELECT count(*) FROM pg_inherits WHERE inhparent = 'call_transcripts_search'::regclass";
    assert_eq!(app.count(attached).await, partitions);

    let again = cli.json(&["search", "index", "--json"]);
    assert_eq!((again["built"].as_array().unwrap().len(), &again["valid"]), (0, &json!(true)), "{again}");

    app.db.store.ensure_partitions(Utc::now() + Duration::days(400), 0).await.unwrap();
    assert_eq!(app.count(attached).await, partitions + 1, "the new partition came with its index");
    assert!(app.db.store.search_index_valid().await.unwrap());
}
