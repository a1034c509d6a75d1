//! A scripted HTTP server for the client's tests: each connection's request head is recorded
//! and answered by a handler writing straight to the socket (one request per connection).

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

pub struct Server {
    pub url: String,
    /// The request heads received, in order.
    pub requests: Arc<Mutex<Vec<String>>>,
}

pub fn serve(handler: impl Fn(&str, &mut TcpStream) + Send + 'static) -> Server {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let recorded = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut head, mut length) = (String::new(), 0);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let _ = reader.read_exact(&mut vec![0; length]);
            recorded.lock().unwrap().push(head.clone());
            handler(&head, &mut stream);
        }
    });
    Server { url, requests }
}

/// The value of a request header, by its lowercase name.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.eq_ignore_ascii_case(name)).then(|| value.trim())
    })
}

/// The request target of a head (`/path?query`).
pub fn target(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

/// Progress that keeps where a bar would stand, and the furthest it stood.
#[derive(Default)]
pub struct Tally {
    /// (position, furthest)
    at: Mutex<(i64, i64)>,
}

impl Tally {
    pub fn position(&self) -> i64 {
        self.at.lock().unwrap().0
    }

    pub fn furthest(&self) -> i64 {
        self.at.lock().unwrap().1
    }

    fn moved(&self, by: i64) {
        let mut at = self.at.lock().unwrap();
        at.0 += by;
        at.1 = at.1.max(at.0);
    }
}

impl crate::Progress for Tally {
    fn begin(&self, _: u64, already: u64) {
        *self.at.lock().unwrap() = (already as i64, already as i64);
    }

    fn advance(&self, bytes: u64) {
        self.moved(bytes as i64);
    }

    fn retreat(&self, bytes: u64) {
        self.moved(-(bytes as i64));
    }

    fn end(&self) {}
}
