use crate::{Env, period};
use callplane_cache::RedisCounter;
use callplane_core::OrgId;
use callplane_core::seams::{Counted, UsageCounter, UsageLedger};
use callplane_testkit::contracts::ledger_row;
use chrono::{DateTime, Duration, Utc};
use std::sync::Arc;
use std::time::Instant;

impl Env {
    fn counter(&self) -> Arc<RedisCounter> {
        Arc::new(RedisCounter::new(self.client.clone(), Arc::new(self.db.store.clone())))
    }

    async fn ledger(&self, org: OrgId, period_start: DateTime<Utc>, call_id: &str, seconds: i64) {
        ledger_row(&self.db.store, org, period_start, call_id, seconds).await;
    }

    /// `n` ledger rows `{prefix}-1` .. `{prefix}-n` of 1 .. n seconds, in one statement.
    async fn ledger_many(&self, org: OrgId, period_start: DateTime<Utc>, prefix: &str, n: i64) {
        sqlx::query(
            "INSERT INTO usage_ledger (call_id, organization_id, period_start, call_started_at, duration_seconds, \
             billable_seconds, ended_reason, counted) \
             SELECT $1 || '-' || i, $2, $3, $3, i, i, 'customer-ended-call', false FROM generate_series(1, $4::bigint) i",
        )
        .bind(prefix)
        .bind(org.0)
        .bind(period_start)
        .bind(n)
        .execute(self.db.store.pool())
        .await
        .unwrap();
    }

    async fn ledger_total(&self, org: OrgId, period_start: DateTime<Utc>) -> i64 {
        UsageLedger::total(&self.db.store, org, period_start).await.unwrap()
    }

    async fn counted(&self, call_id: &str) -> bool {
        sqlx::query_scalar("SELECT counted FROM usage_ledger WHERE call_id = $1")
            .bind(call_id)
            .fetch_one(self.db.store.pool())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn the_usage_counter_contract_holds() {
    let env = Env::new().await;
    let (a, b) = (env.organization(period()).await, env.organization(period()).await);
    callplane_testkit::contracts::usage_counter(env.counter(), &env.db.store, &a, &b, 4000).await;
}

#[tokio::test]
async fn a_call_added_twice_or_from_20_tasks_at_once_counts_once_and_is_marked_counted() {
    let env = Env::new().await;
    let (p, org) = (period(), env.org(period()).await);
    let counter = env.counter();

    // The period's first add finds no total in Redis: it rebuilds from the ledger, which has
    // the call already, so the add itself is not new and the total was not known before.
    env.ledger(org, p, "c1", 61).await;
    assert_eq!(counter.add_call(org, p, "c1", 61).await.unwrap(), Counted { before: None, after: 61, new: false });
    assert!(env.counted("c1").await, "the ledger row was not marked counted");

    env.ledger(org, p, "c2", 30).await;
    assert_eq!(counter.add_call(org, p, "c2", 30).await.unwrap(), Counted { before: Some(61), after: 91, new: true });
    assert_eq!(counter.add_call(org, p, "c2", 30).await.unwrap(), Counted { before: Some(91), after: 91, new: false });
    assert!(env.counted("c2").await);

    env.ledger(org, p, "c3", 45).await;
    let adds = (0..20).map(|_| {
        let counter = counter.clone();
        tokio::spawn(async move { counter.add_call(org, p, "c3", 45).await.unwrap() })
    });
    let results: Vec<Counted> = futures::future::try_join_all(adds).await.unwrap();
    assert_eq!(results.iter().filter(|c| c.new).count(), 1, "{results:?}");
    let new = results.iter().find(|c| c.new).unwrap();
    assert_eq!((new.before, new.after), (Some(91), 136));
    assert!(results.iter().all(|c| c.after == 136), "{results:?}");
    assert_eq!(counter.used(org, p).await.unwrap(), 136);
    assert_eq!(env.ledger_total(org, p).await, 136);
}

#[tokio::test]
async fn concurrent_adds_of_200_distinct_calls_sum_exactly_with_no_gap_or_overlap() {
    let env = Env::new().await;
    let (p, org) = (period(), env.org(period()).await);
    let counter = env.counter();
    assert_eq!(counter.used(org, p).await.unwrap(), 0, "a new period starts from zero");

    env.ledger_many(org, p, "call", 200).await;
    let adds = (1..=200).map(|i| {
        let counter = counter.clone();
        tokio::spawn(async move { counter.add_call(org, p, &format!("call-{i}"), i).await.unwrap() })
    });
    let mut results: Vec<Counted> = futures::future::try_join_all(adds).await.unwrap();
    assert!(results.iter().all(|c| c.new));
    // Each add moved the total from the previous add's `after` to its own: one chain 0 .. sum.
    results.sort_by_key(|c| c.after);
    let mut total = 0;
    for c in &results {
        assert_eq!(c.before, Some(total), "{results:?}");
        total = c.after;
    }
    assert_eq!(total, 200 * 201 / 2);
    assert_eq!(counter.used(org, p).await.unwrap(), env.ledger_total(org, p).await);
    let uncounted: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_ledger WHERE NOT counted")
        .fetch_one(env.db.store.pool())
        .await
        .unwrap();
    assert_eq!(uncounted, 0);
}

#[tokio::test]
async fn after_flushall_used_equals_the_ledger_and_an_add_of_a_ledgered_call_does_not_double_it() {
    let env = Env::new().await;
    let (p, org) = (period(), env.org(period()).await);
    let counter = env.counter();
    for (call, secs) in [("f1", 100), ("f2", 200)] {
        env.ledger(org, p, call, secs).await;
        counter.add_call(org, p, call, secs).await.unwrap();
    }
    // A call whose ledger row committed but whose add never ran (the process stopped).
    env.ledger(org, p, "f3", 300).await;
    assert_eq!(counter.used(org, p).await.unwrap(), 300);

    env.redis.flushall();
    assert_eq!(counter.used(org, p).await.unwrap(), 600, "the total was not rebuilt from the ledger");
    assert_eq!(
        counter.add_call(org, p, "f3", 300).await.unwrap(),
        Counted { before: Some(600), after: 600, new: false },
        "the rebuild took the call from the ledger; adding it again doubled it"
    );

    env.redis.flushall();
    assert_eq!(
        counter.add_call(org, p, "f1", 100).await.unwrap(),
        Counted { before: None, after: 600, new: false },
        "an add after a flush rebuilds on the way and counts nothing twice"
    );
    env.ledger(org, p, "f4", 1).await;
    assert_eq!(counter.add_call(org, p, "f4", 1).await.unwrap(), Counted { before: Some(600), after: 601, new: true });
    assert_eq!(env.ledger_total(org, p).await, 601);
}

#[tokio::test]
async fn adds_racing_rebuilds_after_a_flush_lose_nothing_and_double_nothing() {
    let env = Env::new().await;
    let (p, org) = (period(), env.org(period()).await);
    let counter = env.counter();
    // More calls than one rebuild chunk, so rebuilds take several scripts.
    env.ledger_many(org, p, "early", 2500).await;
    assert_eq!(counter.used(org, p).await.unwrap(), 2500 * 2501 / 2);
    env.redis.flushall();

    env.ledger_many(org, p, "late", 200).await;
    let mut tasks = Vec::new();
    for i in 1..=200 {
        let adder = counter.clone();
        tasks.push(tokio::spawn(async move {
            adder.add_call(org, p, &format!("late-{i}"), i).await.unwrap();
        }));
        if i % 40 == 0 {
            let rebuilder = counter.clone();
            tasks.push(tokio::spawn(async move {
                rebuilder.rebuild(org, p).await.unwrap();
            }));
        }
    }
    futures::future::try_join_all(tasks).await.unwrap();
    let want = 2500 * 2501 / 2 + 200 * 201 / 2;
    assert_eq!(env.ledger_total(org, p).await, want);
    assert_eq!(counter.used(org, p).await.unwrap(), want);
    assert_eq!(counter.rebuild(org, p).await.unwrap(), want, "a rebuild over a complete total changed it");
}

#[tokio::test]
async fn an_empty_period_is_zero_and_the_hash_expires_70_days_after_the_period_starts() {
    let env = Env::new().await;
    let (p, org) = (period(), env.org(period()).await);
    let counter = env.counter();
    assert_eq!(counter.rebuild(org, p).await.unwrap(), 0);
    assert_eq!(counter.used(org, p).await.unwrap(), 0);
    env.ledger(org, p, "e1", 5).await;
    counter.add_call(org, p, "e1", 5).await.unwrap();

    let mut conn = env.conn.clone();
    let key = format!("callplane:usage:{org}:{}", p.timestamp());
    let expires: i64 = redis::cmd("EXPIRETIME").arg(&key).query_async(&mut conn).await.unwrap();
    assert_eq!(expires, (p + Duration::days(70)).timestamp());
    let fields: Vec<String> = redis::cmd("HKEYS").arg(&key).query_async(&mut conn).await.unwrap();
    let mut fields = fields;
    fields.sort();
    assert_eq!(fields, ["c:e1", "ready", "total"], "a rebuild left its token behind, or fields are misnamed");
}

#[tokio::test]
async fn a_redis_restart_fails_calls_fast_while_down_and_totals_equal_the_ledger_after() {
    let mut env = Env::new().await;
    let (p, org) = (period(), env.org(period()).await);
    let counter = env.counter();
    env.ledger(org, p, "r1", 10).await;
    counter.add_call(org, p, "r1", 10).await.unwrap();

    // Restarted at once: the manager's connection is dead, the next call reconnects.
    env.redis.restart();
    env.ledger(org, p, "r2", 20).await;
    assert_eq!(
        counter.add_call(org, p, "r2", 20).await.unwrap(),
        Counted { before: None, after: 30, new: false },
        "the first call after a restart failed, or the emptied total was not rebuilt"
    );

    env.redis.stop();
    env.ledger(org, p, "r3", 30).await;
    for _ in 0..5 {
        let started = Instant::now();
        let add = counter.add_call(org, p, "r3", 30).await.unwrap_err();
        let used = counter.used(org, p).await.unwrap_err();
        let took = started.elapsed();
        assert!(add.is_transient() && used.is_transient(), "{add:?} / {used:?}");
        assert!(took < std::time::Duration::from_secs(1), "two calls to a stopped Redis took {took:?}");
    }
    assert!(!env.counted("r3").await, "a failed add marked its ledger row counted");

    env.redis.start_again();
    assert_eq!(counter.used(org, p).await.unwrap(), 60, "the first call after Redis came back failed");
    assert_eq!(counter.add_call(org, p, "r3", 30).await.unwrap(), Counted { before: Some(60), after: 60, new: false });
    assert!(env.counted("r3").await);
    assert_eq!(env.ledger_total(org, p).await, 60);
}

#[tokio::test]
async fn org_bs_total_never_includes_org_as_calls() {
    let env = Env::new().await;
    let p = period();
    let (a, b) = (env.org(p).await, env.org(p).await);
    let counter = env.counter();
    env.ledger(a, p, "a1", 500).await;
    env.ledger(b, p, "b1", 7).await;
    counter.add_call(a, p, "a1", 500).await.unwrap();
    assert_eq!(counter.used(b, p).await.unwrap(), 7);
    // The same call id sent for org B (a forged or misrouted event) is B's own entry.
    assert_eq!(counter.add_call(b, p, "a1", 500).await.unwrap().after, 507);
    assert_eq!(counter.used(a, p).await.unwrap(), 500);
    env.redis.flushall();
    assert_eq!(counter.used(b, p).await.unwrap(), 7, "org B's rebuild took org A's ledger rows");
    assert_eq!(counter.used(a, p).await.unwrap(), 500);
}

#[tokio::test]
async fn a_hung_redis_fails_calls_within_a_second_and_they_work_once_it_answers() {
    let env = Env::new().await;
    let (p, org) = (period(), env.org(period()).await);
    let counter = env.counter();
    env.ledger(org, p, "h1", 10).await;
    counter.add_call(org, p, "h1", 10).await.unwrap();

    env.redis.pause();
    env.ledger(org, p, "h2", 20).await;
    for _ in 0..3 {
        let started = Instant::now();
        let e = counter.add_call(org, p, "h2", 20).await.unwrap_err();
        let took = started.elapsed();
        assert!(e.is_transient(), "{e:?}");
        assert!(took < std::time::Duration::from_secs(1), "an add to a hung Redis took {took:?}");
    }
    assert!(!env.counted("h2").await, "a failed add marked its ledger row counted");
    // The timed-out adds were still queued on the connection and Redis runs them once it
    // answers; the add that follows (the repair's) finds the call in and counts nothing twice.
    env.redis.resume();
    assert_eq!(counter.add_call(org, p, "h2", 20).await.unwrap().after, 30);
    assert!(env.counted("h2").await);
    assert_eq!(counter.used(org, p).await.unwrap(), env.ledger_total(org, p).await);
}

#[tokio::test]
async fn a_flush_in_the_middle_of_a_rebuild_never_leaves_a_partial_total_marked_ready() {
    let env = Env::new().await;
    let (p, org) = (period(), env.org(period()).await);
    let counter = env.counter();
    // Five rebuild chunks, with FLUSHALLs landing between them.
    env.ledger_many(org, p, "big", 5000).await;
    let want = 5000 * 5001 / 2;
    let flusher = {
        let mut conn = env.conn.clone();
        tokio::spawn(async move {
            loop {
                let _: Result<(), _> = redis::cmd("FLUSHALL").query_async(&mut conn).await;
                tokio::time::sleep(std::time::Duration::from_millis(40)).await;
            }
        })
    };
    let key = format!("callplane:usage:{org}:{}", p.timestamp());
    let (mut finished, mut conn) = (0, env.conn.clone());
    for _ in 0..30 {
        match counter.rebuild(org, p).await {
            Ok(total) => {
                assert_eq!(total, want, "a rebuild returned a partial total");
                finished += 1;
            }
            Err(e) => assert!(e.is_transient(), "{e:?}"),
        }
        let (ready, total): (Option<String>, Option<i64>) =
            redis::cmd("HMGET").arg(&key).arg("ready").arg("total").query_async(&mut conn).await.unwrap();
        if ready.is_some() {
            assert_eq!(total, Some(want), "a partial total was marked ready");
        }
    }
    flusher.abort();
    assert_eq!(counter.used(org, p).await.unwrap(), want);
    println!("{finished} of 30 rebuilds finished between flushes");
}
