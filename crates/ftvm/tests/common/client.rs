//! The client that judges a failover from outside: a thread in the client's namespace
//! counting on the guest's counter, over HTTP (a new connection per request) and over
//! one long-lived TCP session, and recording every value it was ever told.
//!
//! It has one request outstanding at a time and the counter is shared by both ways in,
//! so every value it is told must be larger than every value it was told before:
//! a value at or below the highest one told means acknowledged increments were lost
//! (the guest carried on from an older state), and a repeat means a value was handed
//! out twice. A request that got no answer was never told, so it does not count.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The guest's counter service (counter-httpd).
pub const HTTP_ADDR: &str = "10.0.2.15:80";
pub const SESSION_ADDR: &str = "10.0.2.15:7001";
/// How long an HTTP request may go unanswered before the client gives up on it (long
/// enough for a takeover and a retransmitted SYN).
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// The session waits out a takeover and TCP's retransmission backoff.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);
const PAUSE: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Http,
    Session,
}

#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub value: u64,
    pub at: Instant,
    pub via: Via,
}

#[derive(Debug, Default)]
struct Record {
    answers: Vec<Answer>,
    http_failures: u64,
    session_opened: bool,
    session_broken: Option<String>,
    /// A handle on the session's socket, so that stopping does not wait out its timeout.
    session_socket: Option<TcpStream>,
}

pub struct Client {
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    /// Start counting from inside namespace `ns`.
    pub fn start(ns: &str) -> Client {
        let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the client namespace exists");
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (record.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the client namespace");
            count(&r, &s);
        });
        Client { record, stop, thread: Some(thread) }
    }

    /// Wait until the guest answered at least `n` times in all, over both ways in.
    pub fn wait_for_answers(&self, n: usize, limit: Duration) -> bool {
        self.wait(limit, |r| r.answers.len() >= n && r.session_opened)
    }

    /// The highest value told so far (0 before any).
    pub fn highest(&self) -> u64 {
        self.lock().answers.iter().map(|a| a.value).max().unwrap_or(0)
    }

    pub fn answers(&self) -> Vec<Answer> {
        self.lock().answers.clone()
    }

    /// Answers received after `since`.
    pub fn answers_after(&self, since: Instant) -> Vec<Answer> {
        self.lock().answers.iter().filter(|a| a.at > since).copied().collect()
    }

    /// After a fault at `fault`: wait until the guest that carries on has answered
    /// `n` times on each way in, then judge everything the client was ever told.
    /// `Err` describes what went wrong, for the test's failure message.
    pub fn check_nothing_lost(&self, fault: Instant, n: usize, limit: Duration) -> Result<Verdict, String> {
        let enough = |r: &Record| {
            let after = r.answers.iter().filter(|a| a.at > fault);
            let (http, session) =
                after.fold((0, 0), |(h, s), a| if a.via == Via::Http { (h + 1, s) } else { (h, s + 1) });
            (http >= n && session >= n) || r.session_broken.is_some()
        };
        self.wait(limit, enough);
        let r = self.lock();
        let verdict = Verdict::of(&r.answers, fault);
        if let Some(e) = &r.session_broken {
            return Err(format!("the client's TCP session broke: {e}; {}", verdict.describe()));
        }
        if let Some(problem) = &verdict.problem {
            return Err(format!("{problem}; {}", verdict.describe()));
        }
        if verdict.http_after < n || verdict.session_after < n {
            return Err(format!("too few answers after the fault; {}", verdict.describe()));
        }
        Ok(verdict)
    }

    /// Fails if any value told broke the rule (used where no takeover is expected).
    pub fn check_no_value_lost_or_repeated(&self) -> Result<(), String> {
        let r = self.lock();
        let verdict = Verdict::of(&r.answers, Instant::now());
        match &verdict.problem {
            Some(problem) => Err(format!("{problem}; {}", verdict.describe())),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().expect("not poisoned")
    }

    fn wait(&self, limit: Duration, done: impl Fn(&Record) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done(&self.lock()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        done(&self.lock())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(socket) = self.lock().session_socket.take() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the client's record says about a fault.
#[derive(Debug)]
pub struct Verdict {
    pub answers: usize,
    /// The highest value told before the fault.
    pub highest_before: u64,
    /// The first value told after it, if any.
    pub first_after: Option<u64>,
    pub http_after: usize,
    pub session_after: usize,
    /// The first breach of "every value is above every value told before".
    pub problem: Option<String>,
}

impl Verdict {
    fn of(answers: &[Answer], fault: Instant) -> Verdict {
        let before = answers.iter().filter(|a| a.at <= fault);
        let after: Vec<&Answer> = answers.iter().filter(|a| a.at > fault).collect();
        let mut problem = None;
        let mut highest = 0u64;
        for (i, a) in answers.iter().enumerate() {
            if a.value <= highest && problem.is_none() {
                let lost = highest - a.value + 1;
                problem = Some(format!(
                    "answer #{i} ({:?}) was {} although {highest} had been told: {lost} acknowledged increment(s) lost or handed out twice",
                    a.via, a.value
                ));
            }
            highest = highest.max(a.value);
        }
        Verdict {
            answers: answers.len(),
            highest_before: before.map(|a| a.value).max().unwrap_or(0),
            first_after: after.first().map(|a| a.value),
            http_after: after.iter().filter(|a| a.via == Via::Http).count(),
            session_after: after.iter().filter(|a| a.via == Via::Session).count(),
            problem,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} answers; highest told before the fault {}, first after {:?}; after the fault {} over HTTP, {} on the session",
            self.answers, self.highest_before, self.first_after, self.http_after, self.session_after
        )
    }
}

fn count(record: &Mutex<Record>, stop: &AtomicBool) {
    let http: SocketAddr = HTTP_ADDR.parse().expect("valid address");
    let session_addr: SocketAddr = SESSION_ADDR.parse().expect("valid address");
    let mut session: Option<Session> = None;
    while !stop.load(Ordering::Relaxed) {
        match count_over_http(http, HTTP_TIMEOUT) {
            Ok(value) => {
                let mut r = record.lock().expect("not poisoned");
                r.answers.push(Answer { value, at: Instant::now(), via: Via::Http });
            }
            Err(_) => {
                record.lock().expect("not poisoned").http_failures += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let broken = record.lock().expect("not poisoned").session_broken.is_some();
        if session.is_none() && !broken {
            if let Ok(s) = Session::open(session_addr) {
                let mut r = record.lock().expect("not poisoned");
                r.session_opened = true;
                r.session_socket = s.writer.try_clone().ok();
                session = Some(s);
            }
        }
        if let Some(s) = &mut session {
            let answer = s.count();
            let mut r = record.lock().expect("not poisoned");
            match answer {
                Ok(value) => r.answers.push(Answer { value, at: Instant::now(), via: Via::Session }),
                Err(_) if stop.load(Ordering::Relaxed) => break,
                Err(e) => {
                    r.session_broken = Some(e);
                    session = None;
                }
            }
        }
        std::thread::sleep(PAUSE);
    }
}

/// One HTTP request to the counter, on a new connection.
pub fn count_over_http(addr: SocketAddr, timeout: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
    stream.write_all(b"GET /cgi-bin/count HTTP/1.0\r\nHost: guest\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream.take(4096).read_to_end(&mut response).map_err(|e| e.to_string())?;
    let response = String::from_utf8_lossy(&response);
    let body = response.split("\r\n\r\n").nth(1).ok_or("no HTTP body")?;
    body.trim().parse().map_err(|_| format!("unexpected answer {body:?}"))
}

/// The long-lived session: one line out, the next value back.
struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Session {
    fn open(addr: SocketAddr) -> std::io::Result<Session> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(SESSION_TIMEOUT))?;
        Ok(Session { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    fn count(&mut self) -> Result<u64, String> {
        self.writer.write_all(b"inc\n").map_err(|e| format!("cannot send: {e}"))?;
        let mut line = String::new();
        match (&mut self.reader).take(64).read_line(&mut line) {
            Ok(0) => Err("the guest closed the session".into()),
            Ok(_) => line.trim().parse().map_err(|_| format!("unexpected answer {line:?}")),
            Err(e) => Err(format!("no answer: {e}")),
        }
    }
}
