//! Real processes and breakable network paths for the reliability tests:
//! a private `redis-server` that can be killed, paused and restarted; a TCP
//! proxy that can be cut, black-holed and restored (for Postgres); a
//! blackhole listener that accepts and never answers; and `plangate serve`
//! processes built from `target/debug/plangate` (which `tests/run.sh`
//! builds first).
//!
//! Nothing here touches the machine's shared Redis (6379) or Postgres
//! (5432) beyond ordinary client connections: outages are made on private
//! servers and proxies only.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A port that was free a moment ago (bind :0, read it, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A private `redis-server` (no persistence) on its own port.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Start one on a free port and wait until it answers PING.
    pub fn start() -> RedisServer {
        let mut s = RedisServer {
            port: free_port(),
            child: None,
        };
        s.restart();
        s
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// (Re)start on the same port; waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (tests/run.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if redis_ping(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("private redis-server on port {} did not start", self.port);
    }

    /// SIGKILL it (an abrupt outage: connections reset, port refuses).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the kernel still accepts connections but nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("redis-server running");
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A paused server would not die on SIGTERM; SIGKILL works anyway.
            self.kill();
        }
    }
}

fn redis_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// What a [`TcpCut`] does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathMode {
    /// Bytes flow both ways.
    Forward,
    /// Every connection closed, new ones accepted and closed at once.
    Cut,
    /// Nothing flows, nothing is closed: open connections are frozen and
    /// new ones are accepted and held unanswered (a hung server, a
    /// black-holed network). [`TcpCut::restore`] thaws them.
    Blackhole,
}

/// A TCP proxy to `target` that can be cut (every open connection closed,
/// new ones accepted and closed at once, so clients fail fast), turned
/// into a blackhole (connections accepted and kept, nothing answered, as a
/// stopped server would), and restored. Used between a gateway and the
/// shared Postgres.
pub struct TcpCut {
    pub addr: SocketAddr,
    mode: watch::Sender<PathMode>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpCut {
    /// Listen on a free local port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> TcpCut {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, mode_rx) = watch::channel(PathMode::Forward);
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let task_conns = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *mode_rx.borrow() == PathMode::Cut {
                    drop(client);
                    continue;
                }
                let mut mode = mode_rx.clone();
                let handle = tokio::spawn(async move {
                    // Accepted while black-holed: held, unanswered, until
                    // the path is restored (or cut).
                    if !flowing(&mut mode).await {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (client_rd, client_wr) = client.into_split();
                    let (server_rd, server_wr) = server.into_split();
                    tokio::select! {
                        _ = pump(client_rd, server_wr, mode.clone()) => {}
                        _ = pump(server_rd, client_wr, mode) => {}
                    }
                });
                let mut list = task_conns.lock();
                list.retain(|h| !h.is_finished());
                list.push(handle.abort_handle());
            }
        });
        TcpCut {
            addr,
            mode,
            conns,
            task,
        }
    }

    /// Close every proxied connection and refuse new ones.
    pub fn cut(&self) {
        let _ = self.mode.send(PathMode::Cut);
        for h in self.conns.lock().drain(..) {
            h.abort();
        }
    }

    /// Stop forwarding without closing anything: open connections freeze
    /// (what was sent waits, unread, in the socket buffers), new ones are
    /// accepted and never answered.
    pub fn blackhole(&self) {
        let _ = self.mode.send(PathMode::Blackhole);
    }

    /// Forward again: new connections, and those frozen by
    /// [`TcpCut::blackhole`], which carry on where they stopped.
    pub fn restore(&self) {
        let _ = self.mode.send(PathMode::Forward);
    }
}

/// Wait while the path is black-holed; false once it is cut.
async fn flowing(mode: &mut watch::Receiver<PathMode>) -> bool {
    match mode.wait_for(|m| *m != PathMode::Blackhole).await {
        Ok(m) => *m == PathMode::Forward,
        Err(_) => false,
    }
}

/// Copy `from` to `to` while the path is open; paused (nothing read)
/// while it is black-holed. Returns at end of stream, on an error, or
/// when the path is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<PathMode>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !flowing(&mut mode).await {
            return;
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            // Black-holed (or cut) while waiting for bytes: stop reading.
            _ = mode.changed() => {}
        }
    }
}

impl Drop for TcpCut {
    fn drop(&mut self) {
        self.task.abort();
        for h in self.conns.lock().drain(..) {
            h.abort();
        }
    }
}

/// A listener that accepts connections and never answers: a hung server.
pub struct Blackhole {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            // Keep every socket open and unread.
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        Blackhole { addr, task }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub use crate::plangate_bin;

/// A running `plangate serve --config FILE` process. Its stderr (the log)
/// is written to `log_path`; it is killed on drop.
pub struct GatewayProc {
    pub main: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub log_path: PathBuf,
    child: Child,
    exited: Arc<AtomicBool>,
}

impl GatewayProc {
    /// Spawn `plangate serve --config <config>` with extra environment and
    /// wait (up to 30 s) for its "plangate listening" log line. The log is
    /// text (`PLANGATE_LOG_FORMAT=text`: tests read its messages) unless
    /// `env` says otherwise.
    pub fn spawn(config: &Path, env: &[(&str, &str)]) -> GatewayProc {
        // Under tests/run.sh the log is kept for the whole-run secrets scan.
        let log_path = match crate::test_log_dir() {
            Some(dir) => dir.join(format!("plangate-serve-{}.log", rand::random::<u64>())),
            None => config.with_extension(format!("{}.log", rand::random::<u32>())),
        };
        let mut cmd = Command::new(plangate_bin());
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env("PLANGATE_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn plangate serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, Option<SocketAddr>)>();
        let exited = Arc::new(AtomicBool::new(false));
        let path = log_path.clone();
        let exited_flag = exited.clone();
        // Copy the log to a file, and report the bound addresses once seen.
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::File::create(&path).expect("log file");
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if line.contains("plangate listening") {
                    if let (Some(t), Some(addrs)) = (&tx, parse_listening(&line)) {
                        let _ = t.send(addrs);
                        tx = None;
                    }
                }
            }
            exited_flag.store(true, Ordering::SeqCst);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((main, admin)) => GatewayProc {
                main,
                admin,
                log_path,
                child,
                exited,
            },
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("plangate serve did not start listening:\n{log}");
            }
        }
    }

    /// `kill -9`: no shutdown, no drain; waits for the process to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None)) && !self.exited.load(Ordering::SeqCst)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB (Linux `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.child.id())
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM and wait (up to 15 s) for a graceful exit; the log is then
    /// complete. Returns whether it exited on its own.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // Let the log thread copy the last lines.
                for _ in 0..100 {
                    if self.exited.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        false
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if crate::test_log_dir().is_none() {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `... plangate listening listen=127.0.0.1:1234 admin=Some(127.0.0.1:5678)`,
/// or the same line in JSON (`"listen":"127.0.0.1:1234","admin":"Some(...)"`).
fn parse_listening(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        let main = v["listen"].as_str()?.parse().ok()?;
        let admin = v["admin"]
            .as_str()
            .and_then(|a| a.strip_prefix("Some(")?.strip_suffix(')')?.parse().ok());
        return Some((main, admin));
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(|v| v.trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':'))
    };
    let main = field("listen=")?.parse().ok()?;
    let admin = field("admin=Some(").and_then(|v| v.parse().ok());
    Some((main, admin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_parses() {
        let line = "2026-01-01T00:00:00Z  INFO plangate::app: plangate listening listen=127.0.0.1:41000 admin=Some(127.0.0.1:41001)";
        assert_eq!(
            parse_listening(line),
            Some((
                "127.0.0.1:41000".parse().unwrap(),
                Some("127.0.0.1:41001".parse().unwrap())
            ))
        );
        let line = "INFO plangate listening listen=127.0.0.1:41000 admin=None";
        assert_eq!(
            parse_listening(line),
            Some(("127.0.0.1:41000".parse().unwrap(), None))
        );
        let line = r#"{"timestamp":"2026-12-07T19:25:35Z","level":"INFO","message":"plangate listening","listen":"127.0.0.1:41000","admin":"Some(127.0.0.1:41001)","target":"plangate::app"}"#;
        assert_eq!(
            parse_listening(line),
            Some((
                "127.0.0.1:41000".parse().unwrap(),
                Some("127.0.0.1:41001".parse().unwrap())
            ))
        );
    }
}
