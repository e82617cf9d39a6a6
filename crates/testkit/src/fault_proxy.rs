//! `FaultProxy`: a TCP proxy in front of Postgres that a test can cut off and restore, to
//! see what callplane does while its database is unreachable without stopping the cluster
//! other tests share. Cut off, it drops every open connection and closes each new one at
//! once, as a stopped server or a network partition does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct FaultProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Bumped on every cut: open connections watch it and close.
    generation: watch::Sender<u64>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `target` (`host:port`).
    pub async fn start(target: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let target = target.to_owned();
        let (accept_cut, accept_generation) = (cut.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accept_cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut_off = accept_generation.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else { return };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_off.changed() => {}
                    }
                });
            }
        });
        Ok(Self { addr, cut, generation })
    }

    /// `url` (a Postgres URL) with its host and port replaced by the proxy's.
    pub fn url_through(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
        let (userinfo, hostpath) = match rest.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), rest),
        };
        let path = hostpath.find(['/', '?']).map_or("", |i| &hostpath[i..]);
        format!("{scheme}://{userinfo}{}{path}", self.addr)
    }

    /// Drops every connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_are_rewritten_to_go_through_the_proxy() {
        let proxy = FaultProxy::start("127.0.0.1:1").await.unwrap();
        let port = proxy.addr.port();
        assert_eq!(
            proxy.url_through("postgres://postgres@127.0.0.1:5432/db_1?sslmode=disable"),
            format!("postgres://postgres@127.0.0.1:{port}/db_1?sslmode=disable")
        );
        assert_eq!(proxy.url_through("postgres://u:p@h:1/d"), format!("postgres://u:p@127.0.0.1:{port}/d"));
    }
}
