use crate::{Env, period};
use callplane_cache::RedisFunctionData;
use callplane_core::OrgId;
use callplane_core::seams::FunctionData;
use callplane_storage::PgFunctionData;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(300);

impl Env {
    fn primary(&self) -> Arc<PgFunctionData> {
        Arc::new(PgFunctionData(self.db.store.clone()))
    }

    fn function_data(&self) -> RedisFunctionData {
        RedisFunctionData::new(self.client.clone(), self.primary(), TTL)
    }

    /// What Redis holds for the organization. The test's own connection may have been cut by
    /// a restart: its first command then fails and the manager reconnects for the second.
    async fn cached_json(&self, org: OrgId) -> Option<String> {
        let mut conn = self.conn.clone();
        let get = redis::cmd("GET").arg(format!("callplane:fd:{org}")).clone();
        match get.query_async(&mut conn).await {
            Ok(v) => v,
            Err(_) => get.query_async(&mut conn).await.unwrap(),
        }
    }
}

#[tokio::test]
async fn the_function_data_contract_holds() {
    let env = Env::new().await;
    let (a, b) = (env.org(period()).await, env.org(period()).await);
    callplane_testkit::contracts::function_data(&env.function_data(), a, b).await;
}

#[tokio::test]
async fn reads_go_through_the_cache_and_a_write_is_seen_at_once_by_another_instance() {
    let env = Env::new().await;
    let org = env.org(period()).await;
    let (writer, reader) = (env.function_data(), env.function_data());
    writer.put(org, "hours", &json!("9-5")).await.unwrap();
    assert_eq!(reader.get(org, "hours").await.unwrap(), Some(json!("9-5")));
    assert_eq!(env.cached_json(org).await.as_deref(), Some(r#"{"hours":"9-5"}"#), "the read did not fill the cache");

    // Changed behind the cache's back: reads keep coming from the cache.
    env.primary().put(org, "hours", &json!("behind")).await.unwrap();
    assert_eq!(reader.get(org, "hours").await.unwrap(), Some(json!("9-5")), "the read did not use the cache");

    writer.put(org, "hours", &json!("8-6")).await.unwrap();
    assert_eq!(reader.get(org, "hours").await.unwrap(), Some(json!("8-6")), "a put was not seen at once");
    writer.put(org, "menu", &json!(["soup"])).await.unwrap();
    assert_eq!(reader.preload(org).await.unwrap().len(), 2);
    assert!(writer.delete(org, "hours").await.unwrap());
    assert_eq!(reader.get(org, "hours").await.unwrap(), None, "a delete was not seen at once");
    assert!(!writer.delete(org, "hours").await.unwrap());
}

#[tokio::test]
async fn a_stale_fill_that_raced_a_write_is_dropped_a_second_later() {
    let env = Env::new().await;
    let org = env.org(period()).await;
    let fd = env.function_data();
    fd.put(org, "hours", &json!("new")).await.unwrap();
    // A reader that read the primary before the put fills the cache after the put's first drop.
    let mut conn = env.conn.clone();
    let _: () = redis::cmd("SET")
        .arg(format!("callplane:fd:{org}"))
        .arg(r#"{"hours":"old"}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fd.get(org, "hours").await.unwrap(), Some(json!("old")));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fd.get(org, "hours").await.unwrap(), Some(json!("new")), "the second drop did not run");
}

#[tokio::test]
async fn with_redis_stopped_function_data_is_served_from_the_primary_quickly() {
    let mut env = Env::new().await;
    let org = env.org(period()).await;
    let fd = env.function_data();
    fd.put(org, "hours", &json!("9-5")).await.unwrap();
    assert_eq!(fd.get(org, "hours").await.unwrap(), Some(json!("9-5")));

    env.redis.stop();
    let started = Instant::now();
    assert_eq!(fd.get(org, "hours").await.unwrap(), Some(json!("9-5")));
    fd.put(org, "hours", &json!("8-6")).await.unwrap();
    assert_eq!(fd.get(org, "hours").await.unwrap(), Some(json!("8-6")));
    assert_eq!(fd.preload(org).await.unwrap().len(), 1);
    assert!(fd.delete(org, "hours").await.unwrap());
    assert_eq!(fd.get(org, "hours").await.unwrap(), None);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "six calls with Redis stopped took {took:?}");

    // Back (empty): filled again from the primary.
    env.redis.start_again();
    fd.put(org, "hours", &json!("7-7")).await.unwrap();
    assert_eq!(fd.get(org, "hours").await.unwrap(), Some(json!("7-7")));
    assert_eq!(env.cached_json(org).await.as_deref(), Some(r#"{"hours":"7-7"}"#));
}

#[tokio::test]
async fn a_write_while_redis_hangs_is_dropped_from_the_cache_once_it_answers() {
    let env = Env::new().await;
    let org = env.org(period()).await;
    let fd = env.function_data();
    fd.put(org, "hours", &json!("9-5")).await.unwrap();
    assert_eq!(fd.get(org, "hours").await.unwrap(), Some(json!("9-5")));

    env.redis.pause();
    let started = Instant::now();
    fd.put(org, "hours", &json!("8-6")).await.unwrap();
    assert_eq!(fd.get(org, "hours").await.unwrap(), Some(json!("8-6")), "not served from the primary");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "a put and a get with Redis hung took {took:?}");

    // Redis kept the old map; the write's background drop removes it once Redis answers.
    env.redis.resume();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(fd.get(org, "hours").await.unwrap(), Some(json!("8-6")), "the old map was served after Redis came back");
}
