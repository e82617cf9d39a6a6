//! `RedisServer`: a real `redis-server` per test, on its own loopback port and directory,
//! with nothing persisted, that a test can restart, flush or stop.

#![allow(clippy::expect_used)] // Test harness: a server that cannot start is a failed test.
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "redis-server";
const STARTUP: Duration = Duration::from_secs(10);

pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers PING.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("no free loopback port").port();
        let dir = std::env::temp_dir().join(format!("callplane-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("creating the redis directory");
        let mut server = Self { port, dir, child: None };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server and starts it again on the same port, empty (nothing is persisted).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Kills the server and waits for it to exit; the port refuses connections after this.
    pub fn stop(&mut self) {
        crate::kill(self.child.take());
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a
    /// Redis that hangs or a network that drops packets. Keeps its data.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the redis server is not running");
        let status = Command::new("kill").arg(signal).arg(child.id().to_string()).status().expect("running kill");
        assert!(status.success(), "kill {signal} failed: {status}");
    }

    /// Empties every database of the server.
    pub fn flushall(&self) {
        assert_eq!(self.command("FLUSHALL"), "+OK", "FLUSHALL failed");
    }

    /// Stores `bytes` bytes under `key` (memory for Redis to report).
    pub fn set_bytes(&self, key: &str, bytes: usize) {
        let value = vec![b'x'; bytes];
        let mut command = format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${bytes}\r\n", key.len()).into_bytes();
        command.extend_from_slice(&value);
        command.extend_from_slice(b"\r\n");
        let reply = self.try_raw(&command).unwrap_or_else(|e| panic!("redis SET {key} on port {}: {e}", self.port));
        assert_eq!(reply, "+OK", "SET {key} failed");
    }

    /// The string value at `key` (`redis-cli GET`), if any.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--raw", "GET", key])
            .output()
            .expect("running redis-cli");
        assert!(out.status.success(), "redis-cli GET {key}: {}", String::from_utf8_lossy(&out.stderr));
        let value = String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_owned();
        (!value.is_empty()).then_some(value)
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) {
        let reply = self.command(&format!("DEL {key}"));
        assert!(reply.starts_with(':'), "DEL {key} failed: {reply}");
    }

    fn spawn(&mut self) {
        let child = Command::new(BINARY)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--daemonize", "no"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("could not start `{BINARY}` ({e}): install it: apt-get install -y redis-server")
            });
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        loop {
            if self.ping() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("`{BINARY}` on port {} exited at startup with {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "`{BINARY}` on port {} did not answer PING within {STARTUP:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        self.try_command("PING").is_ok_and(|reply| reply == "+PONG")
    }

    fn command(&self, cmd: &str) -> String {
        self.try_command(cmd).unwrap_or_else(|e| panic!("redis {cmd} on port {}: {e}", self.port))
    }

    /// Sends an inline command and reads the first line of the reply.
    fn try_command(&self, cmd: &str) -> std::io::Result<String> {
        self.try_raw(format!("{cmd}\r\n").as_bytes())
    }

    /// Sends bytes as they are and reads the first line of the reply.
    fn try_raw(&self, command: &[u8]) -> std::io::Result<String> {
        use std::io::{BufRead, BufReader, Write};
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(command)?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
